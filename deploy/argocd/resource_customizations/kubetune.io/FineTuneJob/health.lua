-- Argo CD health check for kubetune.io/FineTuneJob (Lua 5.1, as Argo CD runs it).
-- The operator sets the full condition set (Ready, Running, Succeeded, Failed, Suspended, Reconciling,
-- Stalled) with observedGeneration on every write, and a one-word status.phase.
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= "" then
    return message
  end
  if reason ~= "" then
    return reason
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the FineTuneJob"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
local ready = condition(obj.status.conditions, "Ready")
if observed == nil and ready ~= nil then
  observed = ready.observedGeneration
end
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = obj.status.conditions
local failed = condition(conditions, "Failed")
local stalled = condition(conditions, "Stalled")
local suspended = condition(conditions, "Suspended")
local succeeded = condition(conditions, "Succeeded")
local phase = obj.status.phase

if (failed ~= nil and failed.status == "True") or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  hs.message = describe(failed, describe(stalled, "The fine-tuning job failed"))
  return hs
end
if suspended ~= nil and suspended.status == "True" then
  hs.status = "Suspended"
  hs.message = describe(suspended, "Suspended")
  return hs
end
if (ready ~= nil and ready.status == "True") or (succeeded ~= nil and succeeded.status == "True") then
  hs.status = "Healthy"
  local best = obj.status.bestCheckpoint
  if best ~= nil and best.valPerplexity ~= nil and best.epoch ~= nil then
    hs.message = "Succeeded: best checkpoint at epoch " .. tostring(best.epoch) ..
      ", validation perplexity " .. tostring(best.valPerplexity)
  else
    hs.message = describe(succeeded, "Succeeded")
  end
  return hs
end

-- No decisive condition (an older operator, or conditions not written yet): the phase decides.
if conditions == nil or #conditions == 0 then
  if phase == "Succeeded" then
    hs.status = "Healthy"
    hs.message = "Succeeded"
    return hs
  end
  if phase == "Failed" or phase == "Cancelled" then
    hs.status = "Degraded"
    hs.message = phase
    return hs
  end
  if phase == "Suspended" then
    hs.status = "Suspended"
    hs.message = phase
    return hs
  end
end

hs.status = "Progressing"
hs.message = describe(ready, phase or "Pending")
return hs
