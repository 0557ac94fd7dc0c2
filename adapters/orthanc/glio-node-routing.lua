-- glio-node auto-routing for Orthanc (built-in Lua engine; tested with Debian's Orthanc 1.10.1 only).
--
-- Every series that becomes stable in Orthanc is checked once; a VL Whole Slide Microscopy
-- series (Modality SM) is sent to glio-node by an asynchronous Orthanc job.  glio-node's own
-- results (SEG, SR, ANN, Parametric Map heatmaps) are never routed back: they are not SM, their
-- Manufacturer is "glio-node", and they arrive from glio-node's AE title.  Any one of these
-- guards is enough; all three are checked.  A store job that fails (node down) is
-- resubmitted when the next series becomes stable.
--
-- Edit ONLY the table below.  See adapters/orthanc/README.md.

GLIO_NODE = {
  -- Name of glio-node's entry in Orthanc's "DicomModalities" (the key, not the AE title).
  modality = 'glionode',
  -- Calling AE titles whose instances are never routed (glio-node's [node] ae_title).
  never_route_from = { 'GLIONODE' },
  -- Manufacturer written by glio-node on every result; such series are never routed.
  results_manufacturer = 'glio-node',
  -- Optional rules; all must match for a series to be routed.  Key: a DICOM keyword of the
  -- series' first instance (e.g. BodyPartExamined, InstitutionName, StationName), or
  -- 'Stain', matched against every text inside SpecimenDescriptionSequence (the specimen's
  -- short description and the staining steps' code meanings).  Value: a Lua pattern,
  -- case-insensitive ('' or no rules: route every WSI series).  Example:
  --   rules = { InstitutionName = 'saint.luc', Stain = 'h&e' },
  rules = {},
}

local WSI_SOP_CLASS = '1.2.840.10008.5.1.4.1.1.77.1.6'

local function say(text)
  -- Shows in Orthanc's log as "Lua says: glio-node routing: ...".  Orthanc identifiers
  -- only (opaque hashes): no patient data in the log.
  print('glio-node routing: ' .. text)
end

local function contains(list, value)
  for _, item in ipairs(list) do
    if item == value then return true end
  end
  return false
end

local function texts_in(value, found)
  -- Every string inside a simplified Orthanc tag tree (sequences are tables).
  if type(value) == 'string' then
    table.insert(found, value)
  elseif type(value) == 'table' then
    for _, child in pairs(value) do texts_in(child, found) end
  end
  return found
end

local function matches(pattern, values)
  for _, value in ipairs(values) do
    if string.find(string.lower(value), string.lower(pattern)) then return true end
  end
  return false
end

-- Why this series must not go to glio-node, or nil when it must.
local function reason_not_to_route(seriesId, tags)
  if tags['Modality'] ~= 'SM' then
    return 'Modality is ' .. tostring(tags['Modality']) .. ', not SM'
  end
  if tags['Manufacturer'] == GLIO_NODE.results_manufacturer then
    return 'a glio-node result (Manufacturer)'
  end
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local first = series['Instances'][1]
  if first == nil then return 'no instances' end
  local meta = '/instances/' .. first .. '/metadata/'
  local sopClass = RestApiGet(meta .. 'SopClassUid')
  if sopClass ~= WSI_SOP_CLASS then
    return 'SOP class ' .. tostring(sopClass) .. ' is not VL Whole Slide Microscopy'
  end
  local remote = RestApiGet(meta .. 'RemoteAET')
  if remote ~= nil and contains(GLIO_NODE.never_route_from, remote) then
    return 'sent by ' .. remote .. ' (glio-node itself)'
  end
  local rules = GLIO_NODE.rules or {}
  if next(rules) ~= nil then
    local dataset = ParseJson(RestApiGet('/instances/' .. first .. '/simplified-tags'))
    for keyword, pattern in pairs(rules) do
      local values
      if keyword == 'Stain' then
        values = texts_in(dataset['SpecimenDescriptionSequence'], {})
      else
        values = texts_in(dataset[keyword], {})
      end
      if pattern ~= '' and not matches(pattern, values) then
        return 'rule ' .. keyword .. ' does not match'
      end
    end
  end
  return nil
end

-- Store jobs to glio-node that failed (node down): resubmitted the next time any series
-- becomes stable.  Kept in memory only: lost when Orthanc restarts (see the README).
local failed_jobs = {}

local function node_ae_title()
  local answer = RestApiGet('/modalities/' .. GLIO_NODE.modality .. '/configuration')
  if answer == nil or answer == '' then return nil end
  return ParseJson(answer)['AET']
end

local function resubmit_failed_jobs()
  for jobId, _ in pairs(failed_jobs) do
    failed_jobs[jobId] = nil
    local answer = RestApiGet('/jobs/' .. jobId)
    if answer ~= nil and answer ~= '' and ParseJson(answer)['State'] == 'Failure' then
      RestApiPost('/jobs/' .. jobId .. '/resubmit', '')
      say('job ' .. jobId .. ' resubmitted')
    end
  end
end

function OnStableSeries(seriesId, tags, metadata)
  resubmit_failed_jobs()
  local why = reason_not_to_route(seriesId, tags)
  if why ~= nil then
    say('series ' .. seriesId .. ' not routed: ' .. why)
    return
  end
  local body = { Resources = { seriesId }, Asynchronous = true }
  local answer = ParseJson(RestApiPost('/modalities/' .. GLIO_NODE.modality .. '/store',
                                       DumpJson(body, true)))
  say('series ' .. seriesId .. ' routed to ' .. GLIO_NODE.modality .. ' by job ' .. answer['ID'])
end

function OnJobFailure(jobId)
  -- Orthanc 1.10 does not retry a failed store job by itself.  Ours are resubmitted when the
  -- next series becomes stable; an administrator can resubmit at once (README).
  local job = ParseJson(RestApiGet('/jobs/' .. jobId))
  if job['Type'] == 'DicomModalityStore'
      and job['Content'] ~= nil
      and job['Content']['RemoteAet'] == node_ae_title() then
    failed_jobs[jobId] = true
    say('job ' .. jobId .. ' to ' .. tostring(job['Content']['RemoteAet'])
        .. ' failed; it is resubmitted when the next series becomes stable, or now with: '
        .. 'curl -X POST http://<orthanc>/jobs/' .. jobId .. '/resubmit -d ""')
  end
end
