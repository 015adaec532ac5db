-- Argo CD health of FinetuneJob and AlignmentJob (lmforge.io), from the operator's status.
-- Terminal phases decide first, so a finished job never flaps. Uses only the Lua
-- libraries Argo CD opens (base, table): no string library.
local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function message_of(status, type_, default)
  local c = condition(status, type_)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return default
end

local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the LMForge operator to pick up the job"
  return hs
end
local phase = status.phase

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message_of(status, "Succeeded", "Training succeeded")
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(status, "Failed", "Training failed")
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(status, "Suspended", "runPolicy.suspend is set")
  return hs
end

local stalled = condition(status, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or "Stalled"
  return hs
end

if phase == "Pending" or phase == "Initializing" or phase == "Running" then
  hs.status = "Progressing"
  local msg = message_of(status, "Reconciling", phase)
  local restarting = condition(status, "Restarting")
  if restarting ~= nil and restarting.status == "True" and restarting.message ~= nil then
    msg = msg .. " (" .. restarting.message .. ")"
  end
  hs.message = phase .. ": " .. msg
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
