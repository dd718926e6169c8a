-- Turns every REST response into the documented JSON envelope.
--
-- Runs before the gRPC-JSON transcoder, so on the response path it sees:
--   * transcoded upstream replies: 200 JSON on success, or (convert_grpc_status) an error body
--     {"code":N,"message":"...","details":[...]} built from grpc-status-details-bin;
--   * upstream errors whose details the transcoder could not print: empty body, grpc-status and
--     grpc-message headers;
--   * local replies: transcoder request failures (400 text/plain), the 5 MB buffer limit (413),
--     the 404/405 routes, upstream connection failures (503) and route timeouts (504);
--   * the change feed's Server-Sent Events (a server-streaming method; the transcoder's
--     stream_sse_style_delimited): 200 text/event-stream without a gRPC status. It passes through
--     untouched and unbuffered. A refusal before its first message (credentials, tenant, rate
--     limit) is a trailers-only gRPC reply, which the transcoder turns into an error status and
--     the same {"code",...} body as a unary call's, so it gets the same envelope.
-- Native gRPC calls (request content-type application/grpc*) are never touched.
--
-- Envoy's Lua has no JSON library. The decoder below keeps string literals in their raw, escaped
-- form, so messages are re-emitted byte for byte without any unicode handling.

local NAMESPACE = "disposition.gateway"

local CONTENT_TYPE = "application/json"

local GRPC_HEADERS = { "grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding" }

-- The error vocabulary (server/errors.py), rendered between these lines by `make gen`
-- (gateway/vocabulary.py) into build/envelope.lua, which is what Envoy runs.
-- @vocabulary-begin
local HTTP_STATUS_FOR_REASON = {} -- ErrorInfo reason -> HTTP status
local MESSAGE_FOR_STATUS = {} -- HTTP status -> the envelope's message when a reply has none
local INVALID_JSON_BODY = nil -- the transcoder could not read the body
local VALIDATION_FAILED = nil -- a field of the wrong type
local REPEATED_FIELDS = {} -- path of names ("data.custom_fields") -> true: the requests' lists
-- @vocabulary-end

-- A gRPC status without our ErrorInfo (grpc's own: a cancelled call, its concurrent-call
-- limit, an unknown method, a deadline) -> HTTP status, after google.rpc.Code's documentation.
local HTTP_STATUS_FOR_CODE = {
  -- CANCELLED: a REST client that went away sees no reply at all, so one that gets a reply
  -- was cancelled by the server (shutting down): unavailable, retry (google.rpc says 499).
  [1] = 503, -- CANCELLED
  [2] = 500, -- UNKNOWN
  [3] = 400, -- INVALID_ARGUMENT
  [4] = 504, -- DEADLINE_EXCEEDED
  [5] = 404, -- NOT_FOUND
  [6] = 409, -- ALREADY_EXISTS
  [7] = 403, -- PERMISSION_DENIED
  -- RESOURCE_EXHAUSTED without our RATE_LIMIT_EXCEEDED: not the partner's rate limit but the
  -- server's limit of concurrent calls (grpc's "Concurrent RPC limit exceeded!"). Overload.
  [8] = 503, -- RESOURCE_EXHAUSTED
  [9] = 400, -- FAILED_PRECONDITION
  [10] = 409, -- ABORTED
  [11] = 400, -- OUT_OF_RANGE
  [12] = 501, -- UNIMPLEMENTED
  [13] = 500, -- INTERNAL
  [14] = 503, -- UNAVAILABLE
  [15] = 500, -- DATA_LOSS
  [16] = 401, -- UNAUTHENTICATED
}

-- A reply's envelope message when it carries none of its own.
local function message_for(status)
  return MESSAGE_FOR_STATUS[status] or (status >= 500 and MESSAGE_FOR_STATUS[500] or MESSAGE_FOR_STATUS[400])
end

-- What a JSON value of the wrong type should have been, by the transcoder's type name.
local EXPECTED_FOR_TYPE = {
  TYPE_STRING = "a string",
  TYPE_BOOL = "a boolean",
  TYPE_DOUBLE = "a number",
  TYPE_FLOAT = "a number",
  TYPE_INT32 = "an integer",
  TYPE_INT64 = "an integer",
  TYPE_UINT32 = "an integer",
  TYPE_UINT64 = "an integer",
  TYPE_SINT32 = "an integer",
  TYPE_SINT64 = "an integer",
  TYPE_FIXED32 = "an integer",
  TYPE_FIXED64 = "an integer",
  TYPE_SFIXED32 = "an integer",
  TYPE_SFIXED64 = "an integer",
  TYPE_BYTES = "base64-encoded bytes",
  TYPE_ENUM = "one of the allowed values",
  Map = "an object",
}

---------------------------------------------------------------------------------------------------
-- JSON

-- Decodes `text`; strings stay raw (the characters between the quotes, escapes untouched).
-- Returns the value, or nil when `text` is not valid JSON.
local function json_decode(text)
  local pos = 1

  local function skip()
    pos = string.find(text, "[^ \t\r\n]", pos) or (#text + 1)
  end

  local value

  local function raw_string()
    -- pos is on the opening quote.
    local i = pos + 1
    while true do
      local j = string.find(text, '["\\]', i)
      if j == nil then error("unterminated string") end
      if string.sub(text, j, j) == '"' then
        local raw = string.sub(text, pos + 1, j - 1)
        pos = j + 1
        return { raw = raw }
      end
      i = j + 2 -- skip the escaped character
    end
  end

  local function object()
    local result = {}
    pos = pos + 1
    skip()
    if string.sub(text, pos, pos) == "}" then
      pos = pos + 1
      return result
    end
    while true do
      skip()
      if string.sub(text, pos, pos) ~= '"' then error("expected key") end
      local key = raw_string().raw
      skip()
      if string.sub(text, pos, pos) ~= ":" then error("expected colon") end
      pos = pos + 1
      result[key] = value()
      skip()
      local c = string.sub(text, pos, pos)
      pos = pos + 1
      if c == "}" then return result end
      if c ~= "," then error("expected , or }") end
    end
  end

  local function array()
    local result = {}
    pos = pos + 1
    skip()
    if string.sub(text, pos, pos) == "]" then
      pos = pos + 1
      return result
    end
    while true do
      result[#result + 1] = value()
      skip()
      local c = string.sub(text, pos, pos)
      pos = pos + 1
      if c == "]" then return result end
      if c ~= "," then error("expected , or ]") end
    end
  end

  value = function()
    skip()
    local c = string.sub(text, pos, pos)
    if c == "{" then return object() end
    if c == "[" then return array() end
    if c == '"' then return raw_string() end
    local literal = string.match(text, "^[%w%.%+%-]+", pos)
    if literal == nil then error("unexpected character") end
    pos = pos + #literal
    if literal == "true" then return true end
    if literal == "false" then return false end
    if literal == "null" then return nil end
    local number = tonumber(literal)
    if number == nil then error("bad literal") end
    return number
  end

  local ok, result = pcall(function()
    local v = value()
    skip()
    if pos <= #text then error("trailing data") end
    return v
  end)
  if ok then return result end
  return nil
end

-- A JSON string literal (with quotes) for a Lua string.
local function json_string(s)
  s = string.gsub(s, '[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\t" then return "\\t" end
    if c == "\r" then return "\\r" end
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

local function raw_of(v)
  if type(v) == "table" and type(v.raw) == "string" then return v.raw end
  return nil
end

-- The envelope; `message` and the errors' fields are JSON string literals (with quotes).
local function envelope(message, errors)
  local body = '{"success":false,"message":' .. message
  if errors ~= nil then
    local items = {}
    for i, e in ipairs(errors) do
      items[i] = '{"field":' .. e.field .. ',"message":' .. e.message .. "}"
    end
    body = body .. ',"errors":[' .. table.concat(items, ",") .. "]"
  end
  return body .. "}"
end

---------------------------------------------------------------------------------------------------
-- Classification

-- grpc-message is percent-encoded (gRPC over HTTP/2 spec).
local function percent_decode(s)
  return (string.gsub(s, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- "36.200s" -> 37: whole seconds, rounded up.
local function retry_after_seconds(duration)
  local seconds, fraction = string.match(duration or "", "^(%d+)%.?(%d*)s$")
  if seconds == nil then return nil end
  local result = tonumber(seconds)
  if fraction ~= "" and tonumber(fraction) > 0 then result = result + 1 end
  return result
end

local function type_name(detail)
  local raw = raw_of(detail["@type"]) or ""
  return string.match(raw, "([^/]+)$")
end

-- A gRPC status (code, raw message, decoded details) -> HTTP status, body, extra headers.
-- Our errors carry an ErrorInfo whose reason gives the HTTP status; any other status is
-- grpc's own and goes by its code.
local function from_grpc_status(code, message, details)
  local status = nil
  local errors = nil
  local headers = {}
  for _, detail in ipairs(details or {}) do
    if type(detail) == "table" then
      local name = type_name(detail)
      if name == "google.rpc.ErrorInfo" then
        status = HTTP_STATUS_FOR_REASON[raw_of(detail.reason) or ""]
      elseif name == "google.rpc.BadRequest" then
        local violations = detail.field_violations or detail.fieldViolations or {}
        if #violations > 0 then
          errors = {}
          for i, v in ipairs(violations) do
            errors[i] = {
              field = '"' .. (raw_of(v.field) or "") .. '"',
              message = '"' .. (raw_of(v.description) or "") .. '"',
            }
          end
        end
      elseif name == "google.rpc.RetryInfo" then
        local seconds = retry_after_seconds(raw_of(detail.retry_delay or detail.retryDelay))
        if seconds ~= nil then headers["retry-after"] = tostring(seconds) end
      end
    end
  end
  if status == nil then
    status = HTTP_STATUS_FOR_CODE[code] or 500
    -- A cancelled call and grpc's concurrent-call limit carry grpc's own words: say it the
    -- documented way.
    if code == 1 or code == 8 then message = nil end
  end
  if message == nil or message == "" then
    message = string.sub(json_string(message_for(status)), 2, -2)
  end
  return status, envelope('"' .. message .. '"', errors), headers
end

local function join_path(prefix, name)
  if prefix == "" then return name end
  return prefix .. "." .. name
end

local function validation_failed(field, message)
  local errors = { { field = json_string(field), message = json_string(message) } }
  return 422, envelope(json_string(VALIDATION_FAILED), errors), {}
end

-- A transcoder request failure (400 text/plain) -> 422 for a wrongly typed field, else 400.
local function from_transcoder_failure(text)
  local prefix, name = string.match(text, "^(.-): invalid value Starting an object on a scalar field for type (.+)$")
  if prefix ~= nil then
    local field = join_path(prefix, name)
    return validation_failed(field, field .. " must not be an object")
  end
  prefix, name = string.match(text, "^(.-): invalid value Cannot bind a list to map for field '(.-)'%. for type Map$")
  if prefix ~= nil then
    local field = join_path(prefix, name)
    return validation_failed(field, field .. " must be an object")
  end
  prefix = string.match(text, "^(.-): Proto field is not repeating, cannot start list%.$")
  if prefix ~= nil then
    local where = prefix ~= "" and prefix or "the request body"
    return validation_failed(prefix, where .. " contains an array where a single value is expected")
  end
  local field, type_ = string.match(text, "^(.+): invalid value .* for type (%S+)$")
  if field ~= nil then
    local expected = EXPECTED_FOR_TYPE[type_]
    if expected == nil and string.find(type_, "^type%.googleapis%.com/") then expected = "an object" end
    return validation_failed(field, field .. " must be " .. (expected or "of a valid type"))
  end
  return 400, envelope(json_string(INVALID_JSON_BODY)), {}
end

---------------------------------------------------------------------------------------------------
-- Entry points

-- A REST request's headers travel on as gRPC metadata, whose keys are stricter than HTTP's:
-- [0-9a-z_.-] only. The gRPC server fails a call that carries any other key (INTERNAL, "Illegal
-- header key"), so such headers, which no endpoint reads, are dropped here. So are grpc-* headers
-- (grpc-timeout, grpc-encoding, ... belong to the call the transcoder makes, not to the client)
-- and *-bin keys (binary metadata, base64 expected). Values pass as they are: the server checks
-- the ones it reads (a non-ASCII Idempotency-Key is a 400 that says so, not a key ignored).
local function drop_unforwardable(headers)
  local unforwardable = {}
  for name, _ in pairs(headers) do
    if string.sub(name, 1, 1) ~= ":" and (
        string.find(name, "^[0-9a-z_.%-]+$") == nil
        or string.find(name, "^grpc%-") ~= nil
        or string.find(name, "%-bin$") ~= nil) then
      unforwardable[#unforwardable + 1] = name
    end
  end
  for _, name in ipairs(unforwardable) do headers:remove(name) end
end

-- A scanner of a JSON request body, fed chunk by chunk, for what the transcoder would misread in
-- one of the requests' lists (REPEATED_FIELDS): a value that is not a list (read as a list of
-- that one item), and a list or a null inside one (an inner list's items read as the outer's
-- own, a null dropped): `{"events":"call.processed"}`, `{"events":[["call.processed"],null]}`.
-- It returns the field's path and what is wrong, or nil. Members under other names (unknown,
-- ignored) are not looked into; strings are skipped whole; anything malformed is left to the
-- transcoder. State across chunk ends: `stack` of open containers, each { array = true, known,
-- index } or { key, want_key }; `in_string`, `escaped`; `key_parts` of a key being read;
-- `pending`: the next value must be a list ("list") or must not be a list or null ("item").
local function list_scanner()
  local stack, in_string, escaped, key_parts, pending = {}, false, false, nil, nil
  local function path()
    local parts = {}
    for _, level in ipairs(stack) do
      if level.array then
        parts[#parts + 1] = "[" .. level.index .. "]"
      elseif level.key ~= nil then
        parts[#parts + 1] = (#parts > 0 and "." or "") .. level.key
      end
    end
    return table.concat(parts)
  end
  local function names()  -- the path of names of the value being read, without indices
    local parts = {}
    for _, level in ipairs(stack) do
      if not level.array then parts[#parts + 1] = level.key or "" end
    end
    return table.concat(parts, ".")
  end
  return function(chunk)
    local pos, n = 1, #chunk
    while pos <= n do
      if in_string then
        local j = string.find(chunk, escaped and "." or '["\\]', pos)
        if j == nil then
          if key_parts ~= nil then key_parts[#key_parts + 1] = string.sub(chunk, pos) end
          return nil
        end
        local c = string.sub(chunk, j, j)
        if escaped then
          escaped = false
        elseif c == "\\" then
          escaped = true
        else
          in_string = false
          if key_parts ~= nil then
            key_parts[#key_parts + 1] = string.sub(chunk, pos, j - 1)
            stack[#stack].key, key_parts = table.concat(key_parts), nil
          end
        end
        if in_string and key_parts ~= nil then key_parts[#key_parts + 1] = string.sub(chunk, pos, j) end
        pos = j + 1
      elseif pending ~= nil then
        local k = string.find(chunk, "[^ \t\r\n]", pos)
        if k == nil then return nil end
        local c = string.sub(chunk, k, k)
        local is_list_or_null = c == "[" or c == "n"
        if pending == "list" and not is_list_or_null then return path(), "must be a list" end
        if pending == "item" and is_list_or_null then return path(), "must not be a list or null" end
        pending, pos = nil, k
        if c == "[" then  -- the list of a known field
          stack[#stack + 1] = { array = true, known = true, index = 0 }
          pending, pos = "item", k + 1
        end
      else
        local i = string.find(chunk, '[%[%]{},":]', pos)
        if i == nil then return nil end
        local c, top = string.sub(chunk, i, i), stack[#stack]
        if c == '"' then
          in_string = true
          if top ~= nil and not top.array and top.want_key then
            top.want_key, key_parts = false, {}
          end
        elseif c == ":" then
          if top ~= nil and not top.array and REPEATED_FIELDS[names()] == true then
            pending = "list"
          end
        elseif c == "[" then
          stack[#stack + 1] = { array = true, known = false, index = 0 }
        elseif c == "{" then
          stack[#stack + 1] = { want_key = true }
        elseif c == "]" or c == "}" then
          stack[#stack] = nil
        elseif top ~= nil then -- ","
          if top.array then
            top.index = top.index + 1
            if top.known then pending = "item" end
          else
            top.want_key = true
          end
        end
        pos = i + 1
      end
    end
    return nil
  end
end

function envoy_on_request(handle)
  local content_type = handle:headers():get("content-type") or ""
  if string.find(content_type, "^application/grpc") == nil then
    drop_unforwardable(handle:headers())
    handle:streamInfo():dynamicMetadata():set(NAMESPACE, "rest", true)
    if handle:headers():get(":method") == "HEAD" then
      handle:streamInfo():dynamicMetadata():set(NAMESPACE, "head", true)
    end
    -- The body passes on chunk by chunk as it arrives (nothing is held here), so it can no
    -- longer be answered here: a body with a misread list is spoilt from there on (a control
    -- character the transcoder refuses, in a string or out) and its 400 answered as a 422
    -- naming the field (envoy_on_response).
    local scan, found = list_scanner(), nil
    for chunk in handle:bodyChunks() do
      if found == nil then
        local problem
        found, problem = scan(chunk:getBytes(0, chunk:length()))
        if found ~= nil then
          local where = found ~= "" and found or "the request body"
          handle:streamInfo():dynamicMetadata():set(NAMESPACE, "misread_list", found)
          handle:streamInfo():dynamicMetadata():set(NAMESPACE, "misread_list_problem", where .. " " .. problem)
        end
      end
      if found ~= nil then chunk:setBytes("\1") end
    end
  end
end

-- Unary replies reach REST clients without trailers (the transcoder folds them into the
-- headers); this only guards against a gRPC trailer ever reaching an HTTP/2 REST client.
-- Called last: once trailers are awaited, the headers can no longer be changed.
local function strip_grpc_trailers(handle)
  local trailers = handle:trailers()
  if trailers ~= nil then
    for _, name in ipairs(GRPC_HEADERS) do trailers:remove(name) end
  end
end

-- A Server-Sent Events stream that started: its messages go to the client as they come.
-- (A trailers-only error whose details the transcoder could not print is text/event-stream
-- too, but with an error status and grpc-status: not a started stream.)
local function started_event_stream(http_status, content_type, grpc_status)
  return http_status == 200 and (grpc_status == nil or grpc_status == 0)
    and string.find(content_type, "^text/event%-stream") ~= nil
end

-- Passes a started stream's chunks on as they arrive (bodyChunks neither buffers nor holds
-- them), then drops the gRPC status it ends with (HTTP/2 clients would get it as trailers).
local function pass_event_stream(handle, headers)
  for _, name in ipairs(GRPC_HEADERS) do headers:remove(name) end
  for _ in handle:bodyChunks() do end
  strip_grpc_trailers(handle)
end

function envoy_on_response(handle)
  local metadata = handle:streamInfo():dynamicMetadata():get(NAMESPACE)
  if metadata == nil or metadata.rest ~= true then return end

  local headers = handle:headers()
  local http_status = tonumber(headers:get(":status")) or 500
  local content_type = headers:get("content-type") or ""
  local grpc_status = tonumber(headers:get("grpc-status") or "")
  local grpc_message = headers:get("grpc-message")
  if started_event_stream(http_status, content_type, grpc_status) then
    pass_event_stream(handle, headers)
    return
  end
  local is_json = string.find(content_type, "^application/json") ~= nil
  local success = http_status < 300 and is_json and (grpc_status == nil or grpc_status == 0)

  local status, new_body, extra
  local body = nil
  if not success then
    body = handle:body(true)
    local text = body:getBytes(0, body:length())
    local decoded = is_json and json_decode(text) or nil
    if type(decoded) == "table" and type(decoded.code) == "number" and decoded.code ~= 0 then
      status, new_body, extra = from_grpc_status(decoded.code, raw_of(decoded.message), decoded.details)
    elseif grpc_status ~= nil and grpc_status ~= 0 then
      -- The transcoder could not print the details (a type missing from the descriptor set).
      local message = string.sub(json_string(percent_decode(grpc_message or "")), 2, -2)
      status, new_body, extra = from_grpc_status(grpc_status, message, nil)
    elseif http_status == 400 and metadata.misread_list ~= nil then
      status, new_body, extra = validation_failed(metadata.misread_list, metadata.misread_list_problem)
    elseif http_status == 400 then
      status, new_body, extra = from_transcoder_failure(text)
    else
      status = http_status
      new_body, extra = envelope(json_string(message_for(status))), {}
    end
    if status == 503 and extra["retry-after"] == nil then
      -- Overloaded, shutting down, or no replica to take it: every 503 says try again shortly.
      extra["retry-after"] = "1"
    end
  end

  -- Header objects do not survive a yield (body()): fetch them again.
  headers = handle:headers()
  for _, name in ipairs(GRPC_HEADERS) do headers:remove(name) end
  if not success then
    headers:replace(":status", tostring(status))
    headers:replace("content-type", CONTENT_TYPE)
    for name, value in pairs(extra) do headers:replace(name, value) end
    if metadata.head == true then
      -- A reply to HEAD has no body (RFC 9110 9.3.2): the length the GET's would have.
      headers:replace("content-length", tostring(#new_body))
    else
      body:setBytes(new_body)
    end
  end
  strip_grpc_trailers(handle)
end
