// libFuzzer target: the wire formats instances exchange in a P/D cluster, on arbitrary bytes:
//   byte 0 picks the parser, the rest is its input.
//   0: the transfer engine's region descriptor (transfer::wire::decode_desc; a valid one must
//      re-encode to itself) and "host:port" addresses (split_address)
//   1: an instance's registration in etcd (cluster::instance_from_json; a parsed one must survive
//      to_json -> instance_from_json unchanged)
//   2: a prefill instance's answer to a handoff (pd::verify_answer against a fixed request)
//   3: a decode instance's prefill request (pd::parse_prefill_request, then check_prefill_blocks on a
//      4-token block pool: an accepted request's blocks are in range and cover its prompt)
#include <cstddef>
#include <cstdint>
#include <string>

#include "cluster/membership.h"
#include "kvcache/block_manager.h"
#include "pd/pd.h"
#include "transfer/wire.h"

using namespace larder;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string in(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 4) {
    case 0: {
      auto d = transfer::wire::decode_desc(in);
      if (d.ok()) {
        if (transfer::wire::encode_desc(d->base, d->size, d->rkey.data(), d->rkey.size()) != in) __builtin_trap();
      } else if (d.error().empty()) {
        __builtin_trap();
      }
      std::string host;
      int port = -1;
      if (transfer::wire::split_address(in, &host, &port) && (port < 0 || port > 65535)) __builtin_trap();
      break;
    }
    case 1: {
      auto r = cluster::instance_from_json(in);
      if (!r.ok()) {
        if (r.error().empty()) __builtin_trap();
        break;
      }
      auto back = cluster::instance_from_json(cluster::to_json(*r).dump());
      if (!back.ok() || back->id != r->id || back->role != r->role || back->api_address != r->api_address ||
          back->capacity.kv_blocks != r->capacity.kv_blocks || back->load.free_blocks != r->load.free_blocks)
        __builtin_trap();
      break;
    }
    case 3: {
      pd::PrefillRequest r;
      std::string code;
      Status st = pd::parse_prefill_request(in, &r, &code);
      if (!st.ok()) {
        if (st.error().empty() || (code != "invalid_json" && code != "invalid_value")) __builtin_trap();
        break;
      }
      if (r.id.empty() || r.fetch_tokens < 0) __builtin_trap();
      if (pd::check_prefill_blocks(r, 4).ok()) {
        const size_t n = r.tokens.size();
        if (n == 0 || r.skip < 0 || static_cast<size_t>(r.skip) >= n || r.dst_table.size() < (n + 3) / 4)
          __builtin_trap();
        for (int32_t b : r.dst_table)
          if (b < 0 || b >= r.d_slots / 4) __builtin_trap();
      }
      break;
    }
    default: {
      static const std::vector<kvcache::BlockHash> names = [] {
        std::vector<kvcache::BlockHash> v;
        kvcache::BlockHash h = kvcache::root_hash(kvcache::CacheIdentity{"m", "f16", 4});
        const int32_t toks[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        for (int b = 0; b < 2; ++b) v.push_back(h = kvcache::chain_hash(h, std::span<const int32_t>(toks + 4 * b, 4)));
        return v;
      }();
      RemoteFirst f;
      Status st = pd::verify_answer(in, "L", names, 9, 4, 100, &f);
      if (st.ok() && (f.token < 0 || f.token >= 100)) __builtin_trap();
      if (!st.ok() && st.error().empty()) __builtin_trap();
    }
  }
  return 0;
}
