// SentencePiece vocabularies from llama2.c tokenizer.bin and from a SentencePiece
// ModelProto (tokenizer.model), the latter read with a minimal protobuf wire reader.
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h"

namespace larder {
namespace {

constexpr size_t kMaxFile = size_t(1) << 31;

Result<std::string> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return make_error("tokenizer: cannot open %s", path.c_str());
  const std::streamoff size = f.tellg();
  if (size < 0) return make_error("tokenizer: cannot read %s", path.c_str());
  if (static_cast<uint64_t>(size) > kMaxFile) return make_error("tokenizer: %s is too large", path.c_str());
  std::string data(static_cast<size_t>(size), '\0');
  f.seekg(0);
  if (!f.read(data.data(), size)) return make_error("tokenizer: cannot read %s", path.c_str());
  return data;
}

std::string replace_spaces(const std::string& s) {
  std::string r;
  for (char c : s) {
    if (c == ' ') {
      r += tok::kSpaceMark;
    } else {
      r += c;
    }
  }
  return r;
}

bool is_byte_piece(const std::string& s) {
  return tok::parse_byte_piece(s) >= 0;
}

// ---- protobuf wire format ---------------------------------------------------------

class Wire {
 public:
  Wire(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool done() const { return pos_ >= n_; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= n_) fail("truncated varint");
      const uint8_t b = p_[pos_++];
      v |= uint64_t(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("varint too long");
  }
  // Reads a tag; returns field number and wire type.
  void tag(uint32_t& field, uint32_t& wt) {
    const uint64_t t = varint();
    field = static_cast<uint32_t>(t >> 3);
    wt = static_cast<uint32_t>(t & 7);
    if (field == 0) fail("field number 0");
  }
  Wire sub() {
    const uint64_t len = varint();
    if (len > n_ - pos_) fail("length-delimited field runs past the end");
    Wire w(p_ + pos_, static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return w;
  }
  std::string bytes() {
    Wire w = sub();
    return std::string(reinterpret_cast<const char*>(w.p_), w.n_);
  }
  uint32_t fixed32() {
    if (n_ - pos_ < 4) fail("truncated fixed32");
    uint32_t v;
    std::memcpy(&v, p_ + pos_, 4);
    pos_ += 4;
    return v;
  }
  float f32() {
    const uint32_t u = fixed32();
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  void skip(uint32_t wt) {
    switch (wt) {
      case 0: varint(); break;
      case 1:
        if (n_ - pos_ < 8) fail("truncated fixed64");
        pos_ += 8;
        break;
      case 2: sub(); break;
      case 5: fixed32(); break;
      default: fail("unsupported wire type %u", wt);
    }
  }
  template <class... A>
  [[noreturn]] static void fail(const char* fmt, A... a) {
    throw LoadError{std::string("tokenizer.model: ") + make_error(fmt, a...).msg};
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

int32_t as_i32(uint64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v)); }

}  // namespace

Result<std::unique_ptr<Tokenizer>> load_tokenizer_llama2c(const std::string& path, int32_t n_vocab) {
  auto data_r = read_file(path);
  if (!data_r.ok()) return data_r.take_error();
  const std::string& d = data_r.value();
  if (d.size() < 4) return make_error("tokenizer.bin %s: file too small (%zu bytes)", path.c_str(), d.size());
  int32_t max_len = 0;
  std::memcpy(&max_len, d.data(), 4);
  if (max_len <= 0 || max_len > (1 << 20))
    return make_error("tokenizer.bin %s: implausible max_token_length %d", path.c_str(), max_len);
  // Each token needs at least 8 bytes, which bounds the count by the file size.
  if (n_vocab > 0 && static_cast<uint64_t>(n_vocab) * 8 > d.size() - 4)
    return make_error("tokenizer.bin %s: %d tokens cannot fit in %zu bytes", path.c_str(), n_vocab, d.size());
  Vocab v;
  v.kind = TokenizerKind::SPM;
  size_t pos = 4;
  while (n_vocab > 0 ? v.tokens.size() < static_cast<size_t>(n_vocab) : pos < d.size()) {
    const size_t id = v.tokens.size();
    if (d.size() - pos < 8) return make_error("tokenizer.bin %s: truncated at token %zu", path.c_str(), id);
    float score;
    int32_t len;
    std::memcpy(&score, d.data() + pos, 4);
    std::memcpy(&len, d.data() + pos + 4, 4);
    pos += 8;
    if (len < 0 || static_cast<size_t>(len) > d.size() - pos)
      return make_error("tokenizer.bin %s: token %zu has bad length %d", path.c_str(), id, len);
    std::string piece(d.data() + pos, static_cast<size_t>(len));
    pos += static_cast<size_t>(len);
    // llama2.c's exporter wrote BOS/EOS as "\n<s>\n" / "\n</s>\n" and U+2581 as ' '.
    TokenType t = TokenType::NORMAL;
    if (id == 0) {
      t = TokenType::UNKNOWN;
    } else if ((id == 1 || id == 2) && piece.size() > 2 && piece.front() == '\n' && piece.back() == '\n') {
      piece = piece.substr(1, piece.size() - 2);
      t = TokenType::CONTROL;
    } else if (is_byte_piece(piece)) {
      t = TokenType::BYTE;
    }
    v.tokens.push_back(t == TokenType::NORMAL ? replace_spaces(piece) : piece);
    v.scores.push_back(std::isfinite(score) ? score : -1e30f);
    v.types.push_back(t);
  }
  if (v.tokens.size() < 3) return make_error("tokenizer.bin %s: only %zu tokens", path.c_str(), v.tokens.size());
  v.unk = 0;
  v.bos = 1;
  v.eos = 2;
  v.add_bos = true;
  v.add_space_prefix = true;
  return tok::make_spm(std::move(v), tok::SpmOptions{});
}

Result<std::unique_ptr<Tokenizer>> load_tokenizer_spm_model(const std::string& path) {
  auto data_r = read_file(path);
  if (!data_r.ok()) return data_r.take_error();
  const std::string& d = data_r.value();
  if (d.empty()) return make_error("tokenizer.model %s: empty file", path.c_str());
  Vocab v;
  v.kind = TokenizerKind::SPM;
  int64_t model_type = 1;  // proto default: UNIGRAM
  int32_t unk = 0, bos = 1, eos = 2, pad = -1;
  bool add_dummy_prefix = true, remove_extra_ws = true;
  try {
    Wire w(reinterpret_cast<const uint8_t*>(d.data()), d.size());
    uint32_t f, wt;
    while (!w.done()) {
      w.tag(f, wt);
      if (f == 1 && wt == 2) {  // repeated SentencePiece pieces
        Wire p = w.sub();
        std::string piece;
        float score = 0;
        int64_t type = 1;
        while (!p.done()) {
          uint32_t pf, pwt;
          p.tag(pf, pwt);
          if (pf == 1 && pwt == 2) {
            piece = p.bytes();
          } else if (pf == 2 && pwt == 5) {
            score = p.f32();
          } else if (pf == 3 && pwt == 0) {
            type = static_cast<int64_t>(p.varint());
          } else {
            p.skip(pwt);
          }
        }
        if (type < 1 || type > 6) Wire::fail("piece %zu has invalid type %lld", v.tokens.size(), (long long)type);
        v.tokens.push_back(std::move(piece));
        v.scores.push_back(std::isfinite(score) ? score : -1e30f);
        v.types.push_back(static_cast<TokenType>(type));
      } else if (f == 2 && wt == 2) {  // TrainerSpec
        Wire t = w.sub();
        while (!t.done()) {
          uint32_t tf, twt;
          t.tag(tf, twt);
          if (twt != 0) {
            t.skip(twt);
            continue;
          }
          const uint64_t x = t.varint();
          switch (tf) {
            case 3: model_type = static_cast<int64_t>(x); break;
            case 40: unk = as_i32(x); break;
            case 41: bos = as_i32(x); break;
            case 42: eos = as_i32(x); break;
            case 43: pad = as_i32(x); break;
            default: break;
          }
        }
      } else if (f == 3 && wt == 2) {  // NormalizerSpec
        Wire ns = w.sub();
        while (!ns.done()) {
          uint32_t nf, nwt;
          ns.tag(nf, nwt);
          if (nf == 3 && nwt == 0) {
            add_dummy_prefix = ns.varint() != 0;
          } else if (nf == 4 && nwt == 0) {
            remove_extra_ws = ns.varint() != 0;
          } else {
            ns.skip(nwt);
          }
        }
      } else {
        w.skip(wt);
      }
    }
  } catch (const LoadError& e) {
    return make_error("%s (%s)", e.msg.c_str(), path.c_str());
  }
  if (v.tokens.empty()) return make_error("tokenizer.model %s: no pieces", path.c_str());
  if (model_type != 2)
    return make_error("tokenizer.model %s: SentencePiece model type %lld is not supported (only BPE)", path.c_str(),
                      static_cast<long long>(model_type));
  const int32_t n = static_cast<int32_t>(v.tokens.size());
  auto fix = [n](int32_t id) { return id >= 0 && id < n ? id : -1; };
  v.unk = fix(unk);
  v.bos = fix(bos);
  v.eos = fix(eos);
  v.pad = fix(pad);
  v.add_bos = v.bos >= 0;
  v.add_space_prefix = add_dummy_prefix;
  tok::SpmOptions opt;
  opt.remove_extra_whitespaces = remove_extra_ws;
  return tok::make_spm(std::move(v), opt);
}

}  // namespace larder
