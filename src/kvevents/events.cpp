// KV events: msgpack encoding (msgpack-cxx's packer) and a hand-written, bounds-checked
// decoder. The decoder is separate from msgpack-cxx's unpacker on purpose: it reads straight
// into our structs, never allocates more than the input could describe, skips unknown fields
// of any shape with a depth limit, and reports the first problem as one line (it is fuzzed).
#include "kvevents/events.h"

#define MSGPACK_NO_BOOST
#include <msgpack.hpp>

#include <chrono>
#include <cstring>
#include <limits>

namespace larder::kvevents {

namespace {

// ---- encoding ----

void pack_hash(msgpack::packer<msgpack::sbuffer>& pk, const BlockHash& h) {
  char b[16];
  for (int i = 0; i < 8; ++i) {
    b[i] = static_cast<char>(h.lo >> (8 * i));
    b[8 + i] = static_cast<char>(h.hi >> (8 * i));
  }
  pk.pack_bin(16);
  pk.pack_bin_body(b, 16);
}

void pack_medium(msgpack::packer<msgpack::sbuffer>& pk, const std::string& m) {
  if (m.empty()) {
    pk.pack_nil();
  } else {
    pk.pack_str(static_cast<uint32_t>(m.size()));
    pk.pack_str_body(m.data(), static_cast<uint32_t>(m.size()));
  }
}

void pack_tag(msgpack::packer<msgpack::sbuffer>& pk, std::string_view tag) {
  pk.pack_str(static_cast<uint32_t>(tag.size()));
  pk.pack_str_body(tag.data(), static_cast<uint32_t>(tag.size()));
}

// ---- decoding ----

struct Fail {
  std::string msg;
};

const char* type_name(uint8_t b) {
  if (b <= 0x7f || b >= 0xe0 || (b >= 0xcc && b <= 0xd3)) return "int";
  if (b <= 0x8f || b == 0xde || b == 0xdf) return "map";
  if (b <= 0x9f || b == 0xdc || b == 0xdd) return "array";
  if (b <= 0xbf || (b >= 0xd9 && b <= 0xdb)) return "str";
  switch (b) {
    case 0xc0: return "nil";
    case 0xc2: case 0xc3: return "bool";
    case 0xc4: case 0xc5: case 0xc6: return "bin";
    case 0xca: case 0xcb: return "float";
    case 0xc1: return "invalid byte 0xc1";
    default: return "ext";
  }
}

// A cursor over msgpack bytes; every read checks the bounds and throws Fail.
class Reader {
 public:
  explicit Reader(std::string_view s)
      : p_(reinterpret_cast<const uint8_t*>(s.data())), begin_(p_), end_(p_ + s.size()) {}
  size_t left() const { return static_cast<size_t>(end_ - p_); }
  size_t pos() const { return static_cast<size_t>(p_ - begin_); }
  uint8_t peek() const {
    if (p_ == end_) fail("truncated");
    return *p_;
  }
  bool at_nil() const { return peek() == 0xc0; }
  bool at_array() const { uint8_t b = peek(); return (b >= 0x90 && b <= 0x9f) || b == 0xdc || b == 0xdd; }
  bool at_map() const { uint8_t b = peek(); return (b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf; }
  bool at_str() const { uint8_t b = peek(); return (b >= 0xa0 && b <= 0xbf) || (b >= 0xd9 && b <= 0xdb); }

  [[noreturn]] void fail(const std::string& what) const {
    throw Fail{what + " (at byte " + std::to_string(pos()) + ")"};
  }
  [[noreturn]] void expected(const char* what) const {
    fail(std::string("expected ") + what + ", got " + (p_ == end_ ? "end of input" : type_name(*p_)));
  }

  void nil() {
    if (!at_nil()) expected("nil");
    ++p_;
  }
  // Element counts are checked against the bytes left (each element takes at least one), so
  // a forged count never makes us reserve more than the input could hold.
  uint32_t array() {
    uint8_t b = peek();
    uint32_t n;
    if (b >= 0x90 && b <= 0x9f) n = b & 0x0f, ++p_;
    else if (b == 0xdc) ++p_, n = be(2);
    else if (b == 0xdd) ++p_, n = be(4);
    else expected("array");
    if (n > left()) fail("array of " + std::to_string(n) + " elements in " + std::to_string(left()) + " bytes");
    return n;
  }
  uint32_t map() {
    uint8_t b = peek();
    uint32_t n;
    if (b >= 0x80 && b <= 0x8f) n = b & 0x0f, ++p_;
    else if (b == 0xde) ++p_, n = be(2);
    else if (b == 0xdf) ++p_, n = be(4);
    else expected("map");
    if (uint64_t(n) * 2 > left()) fail("map of " + std::to_string(n) + " entries in " + std::to_string(left()) + " bytes");
    return n;
  }
  std::string_view str() {
    uint8_t b = peek();
    uint32_t n;
    if (b >= 0xa0 && b <= 0xbf) n = b & 0x1f, ++p_;
    else if (b == 0xd9) ++p_, n = be(1);
    else if (b == 0xda) ++p_, n = be(2);
    else if (b == 0xdb) ++p_, n = be(4);
    else expected("str");
    return take(n);
  }
  std::string_view bin() {
    uint8_t b = peek();
    uint32_t n;
    if (b == 0xc4) ++p_, n = be(1);
    else if (b == 0xc5) ++p_, n = be(2);
    else if (b == 0xc6) ++p_, n = be(4);
    else expected("bin");
    return take(n);
  }
  bool at_int() const {
    uint8_t b = peek();
    return b <= 0x7f || b >= 0xe0 || (b >= 0xcc && b <= 0xd3);
  }
  bool at_bin() const { uint8_t b = peek(); return b >= 0xc4 && b <= 0xc6; }
  // Any msgpack integer as (negative?, two's complement bits).
  struct Int {
    bool neg;
    uint64_t bits;
  };
  Int integer() {
    uint8_t b = peek();
    if (b <= 0x7f) return ++p_, Int{false, b};
    if (b >= 0xe0) return ++p_, Int{true, static_cast<uint64_t>(static_cast<int64_t>(static_cast<int8_t>(b)))};
    if (b >= 0xcc && b <= 0xcf) {
      ++p_;
      return Int{false, be(1u << (b - 0xcc))};
    }
    if (b >= 0xd0 && b <= 0xd3) {
      ++p_;
      unsigned n = 1u << (b - 0xd0);
      uint64_t v = be(n);
      if (n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t(0) << (8 * n);  // sign-extend
      return Int{static_cast<int64_t>(v) < 0, v};
    }
    expected("int");
  }
  int64_t int_in(int64_t lo, int64_t hi, const char* what) {
    Int v = integer();
    if (!v.neg && v.bits > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) fail(std::string(what) + " out of range");
    int64_t s = static_cast<int64_t>(v.bits);
    if (s < lo || s > hi) fail(std::string(what) + " out of range: " + std::to_string(s));
    return s;
  }
  double number() {
    uint8_t b = peek();
    if (b == 0xcb) {
      ++p_;
      uint64_t u = be(8);
      double d;
      std::memcpy(&d, &u, 8);
      return d;
    }
    if (b == 0xca) {
      ++p_;
      uint32_t u = static_cast<uint32_t>(be(4));
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    if (at_int()) {
      Int v = integer();
      return v.neg ? static_cast<double>(static_cast<int64_t>(v.bits)) : static_cast<double>(v.bits);
    }
    expected("float");
  }
  // Skips one value of any type; nesting is bounded so hostile input cannot exhaust the stack.
  void skip(int depth = 0) {
    if (depth > 64) fail("nesting deeper than 64");
    uint8_t b = peek();
    if (at_int()) return (void)integer();
    if (at_array()) {
      for (uint32_t i = 0, n = array(); i < n; ++i) skip(depth + 1);
      return;
    }
    if (at_map()) {
      for (uint32_t i = 0, n = map(); i < 2 * n; ++i) skip(depth + 1);
      return;
    }
    if (at_str()) return (void)str();
    switch (b) {
      case 0xc0: case 0xc2: case 0xc3: ++p_; return;
      case 0xc4: case 0xc5: case 0xc6: (void)bin(); return;
      case 0xca: case 0xcb: (void)number(); return;
      case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: ++p_; (void)take(1 + (1u << (b - 0xd4))); return;
      case 0xc7: case 0xc8: case 0xc9: {
        ++p_;
        uint32_t n = static_cast<uint32_t>(be(1u << (b - 0xc7)));
        (void)take(1 + uint64_t(n));
        return;
      }
      default: fail("invalid byte 0xc1");
    }
  }

 private:
  uint64_t be(unsigned n) {
    if (left() < n) fail("truncated");
    uint64_t v = 0;
    for (unsigned i = 0; i < n; ++i) v = (v << 8) | p_[i];
    p_ += n;
    return v;
  }
  std::string_view take(uint64_t n) {
    if (left() < n) fail("truncated: " + std::to_string(n) + " bytes announced, " + std::to_string(left()) + " left");
    std::string_view s(reinterpret_cast<const char*>(p_), static_cast<size_t>(n));
    p_ += n;
    return s;
  }

  const uint8_t* p_;
  const uint8_t* begin_;
  const uint8_t* end_;
};

// For echoing input in an error: printable ASCII only, so the error stays one clean line.
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 64)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}

BlockHash read_hash(Reader& r) {
  if (r.at_int()) return BlockHash{r.integer().bits, 0};
  if (!r.at_bin()) r.expected("a block hash (int or bin)");
  std::string_view b = r.bin();
  auto u = [&](size_t i) { return static_cast<uint64_t>(static_cast<uint8_t>(b[i])); };
  if (b.size() == 16) {
    BlockHash h;
    for (int i = 0; i < 8; ++i) h.lo |= u(i) << (8 * i), h.hi |= u(8 + i) << (8 * i);
    return h;
  }
  if (b.empty() || b.size() > 64) r.fail("block hash of " + std::to_string(b.size()) + " bytes");
  BlockHash h;  // vLLM's int mode: int.from_bytes(digest[-8:], "big")
  for (size_t i = b.size() > 8 ? b.size() - 8 : 0; i < b.size(); ++i) h.lo = (h.lo << 8) | u(i);
  return h;
}

std::vector<BlockHash> read_hashes(Reader& r) {
  std::vector<BlockHash> v(r.array());
  for (auto& h : v) h = read_hash(r);
  return v;
}

std::optional<BlockHash> read_opt_hash(Reader& r) {
  if (r.at_nil()) return r.nil(), std::nullopt;
  return read_hash(r);
}

std::vector<int32_t> read_tokens(Reader& r) {
  std::vector<int32_t> v(r.array());
  for (auto& t : v) t = static_cast<int32_t>(r.int_in(INT32_MIN, INT32_MAX, "token id"));
  return v;
}

int read_block_size(Reader& r) { return static_cast<int>(r.int_in(0, INT32_MAX, "block_size")); }

std::optional<int64_t> read_opt_i64(Reader& r, const char* what) {
  if (r.at_nil()) return r.nil(), std::nullopt;
  return r.int_in(INT64_MIN, INT64_MAX, what);
}

std::string read_medium(Reader& r) {
  if (r.at_nil()) return r.nil(), std::string();
  std::string_view s = r.str();
  if (s.size() > 256) r.fail("medium of " + std::to_string(s.size()) + " bytes");
  return std::string(s);
}

// Wraps a field's errors with its name.
template <class F>
auto field(const char* name, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (Fail& e) {
    throw Fail{std::string(name) + ": " + e.msg};
  }
}

// ["Tag", field, ...]: the positional (msgspec array_like) form; trailing fields may be
// missing (older vLLM) or more than we know (newer vLLM): skipped.
Event read_array_event(Reader& r) {
  uint32_t n = r.array();
  if (n == 0) r.fail("empty event array");
  std::string_view tag = field("type", [&] { return r.str(); });
  uint32_t rest = n - 1, used = 0;
  Event ev;
  if (tag == "BlockStored") {
    if (rest < 4) r.fail("BlockStored with " + std::to_string(rest) + " fields, needs at least 4");
    BlockStored s;
    s.hashes = field("block_hashes", [&] { return read_hashes(r); });
    s.parent = field("parent_block_hash", [&] { return read_opt_hash(r); });
    s.token_ids = field("token_ids", [&] { return read_tokens(r); });
    s.block_size = field("block_size", [&] { return read_block_size(r); });
    used = 4;
    if (rest > used) s.lora_id = field("lora_id", [&] { return read_opt_i64(r, "lora_id"); }), ++used;
    if (rest > used) s.medium = field("medium", [&] { return read_medium(r); }), ++used;
    ev = std::move(s);
  } else if (tag == "BlockRemoved") {
    if (rest < 1) r.fail("BlockRemoved without block_hashes");
    BlockRemoved s;
    s.hashes = field("block_hashes", [&] { return read_hashes(r); });
    used = 1;
    if (rest > used) s.medium = field("medium", [&] { return read_medium(r); }), ++used;
    ev = std::move(s);
  } else if (tag == "AllBlocksCleared") {
    ev = AllBlocksCleared{};
  } else {
    r.fail("unknown event type '" + printable(tag) + "'");
  }
  for (; used < rest; ++used) r.skip();
  return ev;
}

// {"type": "Tag", "field": value, ...}: vLLM's map form (after PR 42892), keys in any order.
Event read_map_event(Reader& r) {
  uint32_t n = r.map();
  std::string tag;
  bool has_hashes = false, has_tokens = false, has_size = false;
  BlockStored s;  // gathers the fields of either kind
  for (uint32_t i = 0; i < n; ++i) {
    if (!r.at_str()) {
      r.skip(), r.skip();  // a non-string key is nothing of ours
      continue;
    }
    std::string_view k = r.str();
    if (k == "type") tag = printable(field("type", [&] { return r.str(); }));
    else if (k == "block_hashes") s.hashes = field("block_hashes", [&] { return read_hashes(r); }), has_hashes = true;
    else if (k == "parent_block_hash") s.parent = field("parent_block_hash", [&] { return read_opt_hash(r); });
    else if (k == "token_ids") s.token_ids = field("token_ids", [&] { return read_tokens(r); }), has_tokens = true;
    else if (k == "block_size") s.block_size = field("block_size", [&] { return read_block_size(r); }), has_size = true;
    else if (k == "lora_id") s.lora_id = field("lora_id", [&] { return read_opt_i64(r, "lora_id"); });
    else if (k == "medium") s.medium = field("medium", [&] { return read_medium(r); });
    else r.skip();
  }
  if (tag == "BlockStored") {
    if (!has_hashes || !has_tokens || !has_size) r.fail("BlockStored without block_hashes, token_ids or block_size");
    return s;
  }
  if (tag == "BlockRemoved") {
    if (!has_hashes) r.fail("BlockRemoved without block_hashes");
    return BlockRemoved{std::move(s.hashes), std::move(s.medium)};
  }
  if (tag == "AllBlocksCleared") return AllBlocksCleared{};
  if (tag.empty()) r.fail("event map without a \"type\"");
  r.fail("unknown event type '" + tag + "'");
}

std::vector<Event> read_events(Reader& r) {
  uint32_t n = r.array();
  std::vector<Event> v;
  v.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    try {
      v.push_back(r.at_map() ? read_map_event(r) : read_array_event(r));
    } catch (Fail& e) {
      throw Fail{"event " + std::to_string(i) + ": " + e.msg};
    }
  }
  return v;
}

std::optional<int> read_dp_rank(Reader& r) {
  if (r.at_nil()) return r.nil(), std::nullopt;
  return static_cast<int>(r.int_in(INT32_MIN, INT32_MAX, "data_parallel_rank"));
}

EventBatch read_batch(Reader& r) {
  EventBatch b;
  if (r.at_map()) {  // a batch without array_like: {"ts", "events", "data_parallel_rank"}
    uint32_t n = r.map();
    bool has_ts = false, has_events = false;
    for (uint32_t i = 0; i < n; ++i) {
      if (!r.at_str()) {
        r.skip(), r.skip();
        continue;
      }
      std::string_view k = r.str();
      if (k == "ts") b.ts = field("ts", [&] { return r.number(); }), has_ts = true;
      else if (k == "events") b.events = read_events(r), has_events = true;
      else if (k == "data_parallel_rank") b.dp_rank = read_dp_rank(r);
      else r.skip();
    }
    if (!has_ts || !has_events) r.fail("batch map without ts or events");
    return b;
  }
  if (!r.at_array()) r.expected("a batch (array)");
  uint32_t n = r.array();
  if (n < 2) r.fail("batch of " + std::to_string(n) + " fields, needs ts and events");
  b.ts = field("ts", [&] { return r.number(); });
  b.events = read_events(r);
  if (n >= 3) b.dp_rank = field("data_parallel_rank", [&] { return read_dp_rank(r); });
  for (uint32_t i = 3; i < n; ++i) r.skip();
  return b;
}

}  // namespace

std::string encode(const EventBatch& b) {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_array(3);
  pk.pack_double(b.ts);
  pk.pack_array(static_cast<uint32_t>(b.events.size()));
  for (const Event& e : b.events) {
    if (const auto* s = std::get_if<BlockStored>(&e)) {
      pk.pack_array(8);
      pack_tag(pk, "BlockStored");
      pk.pack_array(static_cast<uint32_t>(s->hashes.size()));
      for (const auto& h : s->hashes) pack_hash(pk, h);
      if (s->parent) pack_hash(pk, *s->parent);
      else pk.pack_nil();
      pk.pack_array(static_cast<uint32_t>(s->token_ids.size()));
      for (int32_t t : s->token_ids) pk.pack_int32(t);
      pk.pack_int(s->block_size);
      if (s->lora_id) pk.pack_int64(*s->lora_id);
      else pk.pack_nil();
      pack_medium(pk, s->medium);
      pk.pack_nil();  // lora_name
    } else if (const auto* rm = std::get_if<BlockRemoved>(&e)) {
      pk.pack_array(3);
      pack_tag(pk, "BlockRemoved");
      pk.pack_array(static_cast<uint32_t>(rm->hashes.size()));
      for (const auto& h : rm->hashes) pack_hash(pk, h);
      pack_medium(pk, rm->medium);
    } else {
      pk.pack_array(1);
      pack_tag(pk, "AllBlocksCleared");
    }
  }
  if (b.dp_rank) pk.pack_int(*b.dp_rank);
  else pk.pack_nil();  // msgspec writes the defaulted field of an array_like struct too
  return std::string(buf.data(), buf.size());
}

Result<EventBatch> decode(std::string_view payload) {
  try {
    Reader r(payload);
    EventBatch b = read_batch(r);
    if (r.left() != 0) r.fail(std::to_string(r.left()) + " bytes after the batch");
    return b;
  } catch (Fail& e) {
    return Error{"kv event batch: " + e.msg};
  } catch (std::bad_alloc&) {
    return Error{"kv event batch: out of memory"};
  }
}

Medium medium_of(std::string_view s) {
  std::string u(s.substr(0, 16));
  for (char& c : u) c = (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c;
  if (s.size() > 16) return Medium::L1;
  if (u == "DRAM" || u == "CPU") return Medium::Dram;
  if (u == "SSD" || u == "DISK" || u == "STORAGE") return Medium::Disk;
  return Medium::L1;  // "L1", "GPU", nil and anything unknown: the engine's own pool
}

void HeldBlocks::apply(const Event& e) {
  if (const auto* s = std::get_if<BlockStored>(&e)) {
    size_t m = idx(medium_of(s->medium));
    sets_[m].insert(s->hashes.begin(), s->hashes.end());
    block_size_[m] = s->block_size;
  } else if (const auto* r = std::get_if<BlockRemoved>(&e)) {
    auto& set = sets_[idx(medium_of(r->medium))];
    for (const auto& h : r->hashes) set.erase(h);
  } else {
    for (auto& set : sets_) set.clear();
  }
}

void HeldBlocks::apply(const EventBatch& b) {
  for (const auto& e : b.events) apply(e);
}

void HeldBlocks::clear() {
  for (auto& set : sets_) set.clear();
}

EventBatch HeldBlocks::snapshot(double ts) const {
  EventBatch b;
  b.ts = ts;
  b.events.push_back(AllBlocksCleared{});
  for (Medium m : {Medium::L1, Medium::Dram, Medium::Disk}) {
    const auto& set = sets_[idx(m)];
    if (set.empty()) continue;
    BlockStored s;
    s.hashes.assign(set.begin(), set.end());
    s.block_size = block_size_[idx(m)];
    s.medium = kvcache::medium_name(m);
    b.events.push_back(std::move(s));
  }
  return b;
}

bool HeldBlocks::operator==(const HeldBlocks& o) const {
  return sets_[0] == o.sets_[0] && sets_[1] == o.sets_[1] && sets_[2] == o.sets_[2];
}

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace larder::kvevents
