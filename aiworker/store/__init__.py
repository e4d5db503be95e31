"""What the node keeps: received instances as files (:mod:`.spool`, the data dir's
:mod:`.layout`) and the state DB (:mod:`.db` over :mod:`.schema`: studies, series, events,
selections, jobs, the durable :mod:`.outbox`); the completion scheduler, start-up
:mod:`.reconcile`, :mod:`.retention`, and the read models of ``status``, the dashboard and
the metrics (:mod:`.status`, :mod:`.dashboard`, :mod:`.stats`)."""
