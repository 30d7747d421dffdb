-- Argo CD health check for kubetune.io/EvalJob (Lua 5.1, as Argo CD runs it).
-- Conditions: Ready, Running, Succeeded, Failed, Reconciling, Stalled, GatePassed, each with
-- observedGeneration. Phases: Pending, Waiting (reason WaitingForModel), Serving, Evaluating,
-- Succeeded, Failed. A failed gate is phase Failed with reason GateFailed.
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
  hs.message = "Waiting for the kubetune operator to pick up the EvalJob"
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
local succeeded = condition(conditions, "Succeeded")
local gatePassed = condition(conditions, "GatePassed")
local gate = obj.status.gate
local phase = obj.status.phase
local noConditions = conditions == nil or #conditions == 0

local function gateMessage(fallback)
  if gate ~= nil and gate.message ~= nil and gate.message ~= "" then
    return gate.message
  end
  if gatePassed ~= nil and gatePassed.message ~= nil and gatePassed.message ~= "" then
    return gatePassed.message
  end
  return fallback
end

local function gateFailed()
  if failed ~= nil and failed.reason == "GateFailed" then
    return true
  end
  if gate ~= nil and gate.passed == false then
    return true
  end
  return gatePassed ~= nil and gatePassed.status == "False"
end

if (failed ~= nil and failed.status == "True") or (stalled ~= nil and stalled.status == "True") or
    (noConditions and phase == "Failed") then
  hs.status = "Degraded"
  if gateFailed() then
    hs.message = "Gate failed: " .. gateMessage(describe(failed, "a candidate missed the gate"))
  else
    hs.message = describe(failed, describe(stalled, "The evaluation failed"))
  end
  return hs
end
if (ready ~= nil and ready.status == "True") or (succeeded ~= nil and succeeded.status == "True") or
    (noConditions and phase == "Succeeded") then
  hs.status = "Healthy"
  if gate ~= nil and gate.passed == true then
    hs.message = "Gate passed: " .. gateMessage("every check held")
  else
    hs.message = describe(succeeded, "Succeeded")
  end
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, phase or "Pending")
return hs
