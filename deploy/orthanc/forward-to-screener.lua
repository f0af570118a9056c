-- forward-to-screener.lua: Orthanc auto-routing to the cspine-screener node (Orthanc 1.10).
--
-- What: every CR or DX image Orthanc stores is forwarded to the DICOM modality "cspine" (the
-- screener node, declared in "DicomModalities" of orthanc.json). Nothing else is forwarded: not
-- the Structured Reports the node sends back (that would loop), not CT/MR/US/..., not DX
-- mammography or intra-oral images (the node refuses those SOP classes anyway).
--
-- Why per instance (OnStoredInstance) and not per study (OnStableStudy):
--  * latency: the node already waits until a study has been quiet for `study_stable_s` before it
--    screens it; OnStableStudy would put Orthanc's StableAge (60 s) in front of that for nothing.
--  * no loops: when the node's SR arrives, the study changes and later becomes "stable" again, so
--    a study-level rule would send the whole study again after every result. Per instance, the SR
--    is simply not a CR/DX image and is ignored.
--  * a re-sent image is harmless: the node's store is idempotent on SOP Instance UID.
--
-- How: each image becomes an asynchronous Orthanc store job (POST /modalities/cspine/store) rather
-- than SendToModality(): SendToModality only logs a failed C-STORE and forgets it, while a failed
-- job stays listed in GET /jobs (Orthanc Explorer > Jobs), is logged below by OnJobFailure, and can
-- be resubmitted with POST /jobs/<id>/resubmit. Orthanc does not retry by itself.
-- The callbacks never block on the network and never raise: errors are logged and swallowed.
--
-- Orthanc loads all LuaScripts into one Lua state: if your site already defines OnStoredInstance
-- or OnJobFailure in another script, merge the bodies (the last definition wins).

local MODALITY = 'cspine'              -- key of the screener node in "DicomModalities"
local DEFAULT_SCREENER_AET = 'CSPINE'  -- used if the AE title of that entry cannot be read

-- The SOP classes the node accepts: CR, DX for presentation, DX for processing.
local SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = 'CR',
  ['1.2.840.10008.5.1.4.1.1.1.1'] = 'DX',
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = 'DX',
}
local MODALITIES = { CR = true, DX = true }

-- Optional: forward only these Body Part Examined values (upper case). Empty table: every CR/DX
-- image. Body Part Examined is often missing or free text on X-ray equipment, so by default every
-- CR/DX image goes and the node's routing rules skip (and record) what they cannot screen. A site
-- that wants to send the screener only what it needs can list its own values, e.g.
--   local BODY_PARTS = { CSPINE = true, NECK = true, ['C-SPINE'] = true, ['CERVICAL SPINE'] = true }
local BODY_PARTS = {}

local function Log(message)
  print('cspine-screener routing: ' .. message)
end

local function Clean(value)
  if type(value) ~= 'string' then
    return ''
  end
  local s = string.gsub(value, '^%s+', '')
  s = string.gsub(s, '%s+$', '')
  return s
end

local function Upper(value)
  return string.upper(Clean(value))
end

local screenerAet = nil

-- The AE title of the "cspine" modality (from the REST API, so a modality stored in the database
-- works too); cached after the first successful read.
local function ScreenerAet()
  if screenerAet ~= nil then
    return screenerAet
  end
  local ok, aet = pcall(function()
    local modalities = ParseJson(RestApiGet('/modalities?expand'))
    local entry = modalities[MODALITY]
    if type(entry) == 'table' and type(entry['AET']) == 'string' then
      return Upper(entry['AET'])
    end
    return nil
  end)
  if ok and aet ~= nil and aet ~= '' then
    screenerAet = aet
    return aet
  end
  Log('no DicomModalities entry "' .. MODALITY .. '" readable; assuming AE title ' .. DEFAULT_SCREENER_AET)
  return DEFAULT_SCREENER_AET
end

-- true, or false and the reason (a UID or code value, never patient data).
local function ShouldForward(tags, metadata, origin)
  local sopClass = Clean(tags['SOPClassUID'])
  if sopClass == '' and type(metadata) == 'table' then
    sopClass = Clean(metadata['SopClassUid'])
  end
  if SOP_CLASSES[sopClass] == nil then
    return false, 'SOP class ' .. sopClass
  end
  local modality = Upper(tags['Modality'])
  if not MODALITIES[modality] then
    return false, 'modality ' .. modality
  end
  if type(origin) == 'table' and origin['RequestOrigin'] == 'DicomProtocol'
     and Upper(origin['RemoteAet']) == ScreenerAet() then
    return false, 'sent by the screener itself'
  end
  if next(BODY_PARTS) ~= nil and not BODY_PARTS[Upper(tags['BodyPartExamined'])] then
    return false, 'body part ' .. Upper(tags['BodyPartExamined'])
  end
  return true, ''
end

local function Forward(instanceId)
  local body = DumpJson({ Resources = { instanceId }, Asynchronous = true }, true)
  local answer = RestApiPost('/modalities/' .. MODALITY .. '/store', body)
  local job = ParseJson(answer)
  Log('instance ' .. instanceId .. ' queued for ' .. MODALITY .. ' (job ' .. tostring(job['ID']) .. ')')
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  local ok, err = pcall(function()
    local forward = ShouldForward(tags or {}, metadata, origin)
    if forward then
      Forward(instanceId)
    end
  end)
  if not ok then
    Log('ERROR: instance ' .. tostring(instanceId) .. ' not forwarded to ' .. MODALITY .. ': ' .. tostring(err)
        .. ' (send it again with POST /modalities/' .. MODALITY .. '/store)')
  end
end

function OnJobFailure(jobId)
  local ok, err = pcall(function()
    local job = ParseJson(RestApiGet('/jobs/' .. jobId))
    local content = job['Content'] or {}
    if job['Type'] ~= 'DicomModalityStore' or Upper(content['RemoteAet']) ~= ScreenerAet() then
      return
    end
    Log('ERROR: forwarding to ' .. MODALITY .. ' failed (job ' .. jobId .. '): '
        .. tostring(job['ErrorDescription']) .. ' ' .. Clean(tostring(job['ErrorDetails'] or ''))
        .. '; resubmit with POST /jobs/' .. jobId .. '/resubmit')
  end)
  if not ok then
    Log('ERROR: could not inspect failed job ' .. tostring(jobId) .. ': ' .. tostring(err))
  end
end

Log('loaded: CR/DX images are forwarded to DICOM modality "' .. MODALITY .. '"')
