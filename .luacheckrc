-- luacheck (Debian's lua-check), run by `make lint` and tests/unit/test_lua_filter_lint.py on
-- gateway/envelope.lua and the build/envelope.lua that `make gen` renders from it.
-- Envoy runs the filter with LuaJIT (Lua 5.1); it calls these two globals, and nothing else of
-- the filter may be global.
std = "luajit"
globals = { "envoy_on_request", "envoy_on_response" }
