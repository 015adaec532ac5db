-- Argo CD health of InferenceService (lmforge.io), from the operator's status.
-- Uses only the Lua libraries Argo CD opens (base, table): no string library.
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
  hs.message = "Waiting for the LMForge operator to pick up the service"
  return hs
end
local phase = status.phase
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

if phase == "Ready" then
  if obj.spec ~= nil and obj.spec.replicas == 0 then
    hs.status = "Suspended"
    hs.message = "Scaled to zero replicas"
    return hs
  end
  hs.status = "Healthy"
  hs.message = message_of(status, "Ready", "Serving")
  return hs
end
if phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  local msg = message_of(status, "Ready", phase)
  if status.adapters ~= nil then
    for _, a in ipairs(status.adapters) do
      if a.state == "Failed" then
        msg = msg .. "; adapter " .. a.name .. " failed: " .. (a.message or "")
      end
    end
  end
  hs.message = msg
  return hs
end
if phase == "Pending" or phase == "Loading" then
  if obj.spec ~= nil and obj.spec.replicas == 0 then
    hs.status = "Suspended"
    hs.message = "Scaled to zero replicas"
    return hs
  end
  hs.status = "Progressing"
  hs.message = phase .. ": " .. message_of(status, "Ready", "starting")
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
