-- Orthanc auto-routing to the aiworker node (loaded through "LuaScripts" in orthanc.json).
--
-- When a study has been stable for StableAge seconds, its MR knee series that were not
-- forwarded yet are sent to the node (the DicomModalities entry "aiworker") on one
-- association. A series counts as knee when BodyPartExamined, SeriesDescription or the
-- study's StudyDescription says KNEE. The node's own results come back into the same study
-- (SEG, SR, the preview Secondary Capture, all with Manufacturer "aiworker"); they are never
-- forwarded, and each forwarded series is marked with the metadata AiworkerRouted, so the
-- study becoming stable again after the results arrived sends nothing twice.

local NODE = 'aiworker'            -- the node's name in DicomModalities
local MARK = 'AiworkerRouted'      -- user metadata (UserMetadata in orthanc.json)
local OWN_MANUFACTURER = 'aiworker'

-- Whether text (a tag value, possibly nil) mentions the knee.
local function MentionsKnee(text)
  return text ~= nil and string.find(string.upper(text), 'KNEE', 1, true) ~= nil
end

-- Whether a series (its main DICOM tags) is an acquired MR knee series, not a node result.
function IsRoutedToNode(studyTags, seriesTags)
  if seriesTags['Modality'] ~= 'MR' then
    return false   -- SEG, SR, OT (secondary capture), CT, ...: never
  end
  if string.lower(seriesTags['Manufacturer'] or '') == OWN_MANUFACTURER then
    return false   -- the node's own objects, whatever their modality
  end
  return MentionsKnee(seriesTags['BodyPartExamined'])
    or MentionsKnee(seriesTags['SeriesDescription'])
    or MentionsKnee(studyTags['StudyDescription'])
end

-- Whether the series was forwarded before (it carries the metadata MARK).
local function AlreadyRouted(seriesId)
  local names = RestApiGet('/series/' .. seriesId .. '/metadata')
  if names == nil then
    return false
  end
  for _, name in ipairs(ParseJson(names)) do
    if name == MARK then
      return true
    end
  end
  return false
end

function OnStableStudy(studyId, tags, metadata)
  local pending = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if IsRoutedToNode(tags, series['MainDicomTags']) and not AlreadyRouted(series['ID']) then
      table.insert(pending, series['ID'])
    end
  end
  if #pending == 0 then
    return
  end
  local answer = RestApiPost('/modalities/' .. NODE .. '/store',
                             DumpJson({ Resources = pending, Synchronous = true }, true))
  if answer == nil then
    print('aiworker-route: sending ' .. #pending .. ' series of study ' .. studyId ..
          ' to ' .. NODE .. ' failed; resend with POST /modalities/' .. NODE .. '/store')
    return
  end
  for _, seriesId in ipairs(pending) do
    RestApiPut('/series/' .. seriesId .. '/metadata/' .. MARK, 'yes')
  end
  print('aiworker-route: sent ' .. #pending .. ' MR series of study ' .. studyId .. ' to ' .. NODE)
end
