"""Series selection: derived series features, the rule engine, and the select stage.

``headers`` reads a series' DICOM headers (never its pixels); ``features`` and ``geometry``
derive what a rule needs from them (plane, weighting, fat suppression, localizer, derived,
slice geometry); ``rules`` is the rule language of the files under ``config/rules/``;
``decide`` applies a pipeline's rules to a study and explains every verdict; ``worker`` is
the node's select stage, which turns each completed study into a recorded decision and,
for a match, a queued job.
"""
