-- wrk script: binary CloudEvents as a KafkaSource delivers them, each with a new id.
-- RUN_ID (environment) keeps ids unique across runs; each wrk thread adds its number.
local body = '{"actor":{"id":"officer-7","type":"user","session_id":"s-81"},"action":"create",'
  .. '"outcome":"success","resource":{"type":"payment","id":"pay-1","amount":125.5,'
  .. '"currency":"PHP"},"context":{"bank":"BDO"}}'
local threads = 0
counter = 0
prefix = ""

function setup(thread)
  threads = threads + 1
  thread:set("prefix", os.getenv("RUN_ID") .. "-" .. threads .. "-")
end

function request()
  counter = counter + 1
  return wrk.format("POST", "/", {
    ["Content-Type"] = "application/json",
    ["ce-specversion"] = "1.0",
    ["ce-id"] = prefix .. counter,
    ["ce-source"] = "openg2p/registry",
    ["ce-type"] = "org.openg2p.payment.created",
    ["ce-subject"] = "beneficiary/42",
    ["ce-time"] = "2026-04-01T12:00:00Z",
    ["ce-traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
  }, body)
end
