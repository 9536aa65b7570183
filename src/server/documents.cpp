#include "server/documents.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

namespace larder::server {

namespace fs = std::filesystem;

std::string DocumentStore::id_of(std::string_view text) {
  const XXH128_hash_t h = XXH3_128bits(text.data(), text.size());
  char buf[40];
  std::snprintf(buf, sizeof buf, "doc-%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  return buf;
}

Result<std::unique_ptr<DocumentStore>> DocumentStore::open(const std::string& dir) {
  auto s = std::unique_ptr<DocumentStore>(new DocumentStore());
  if (dir.empty()) return s;
  s->dir_ = dir + "/documents";
  std::error_code ec;
  fs::create_directories(s->dir_, ec);
  if (ec) return make_error("cannot create %s: %s", s->dir_.c_str(), ec.message().c_str());
  for (const auto& e : fs::directory_iterator(s->dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() != 40 || name.compare(36, 4, ".txt") != 0) continue;  // doc-<32 hex>.txt; .tmp leftovers
    std::ifstream f(e.path(), std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    std::string text = ss.str();
    // A file that does not hash to its name (torn, edited) is not served.
    if (f && id_of(text) == name.substr(0, 36)) s->texts_.emplace(name.substr(0, 36), std::move(text));
  }
  return s;
}

Result<std::string> DocumentStore::put(const std::string& text) {
  const std::string id = id_of(text);
  std::lock_guard<std::mutex> lk(mu_);
  if (texts_.count(id)) return id;
  if (!dir_.empty()) {
    // Written whole then renamed: a crash leaves the old state or the new, never half a text.
    const std::string tmp = dir_ + "/" + id + ".tmp", path = dir_ + "/" + id + ".txt";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) return make_error("cannot store the document: cannot create %s", tmp.c_str());
    bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    ok = std::fflush(f) == 0 && ok;
    ok = std::fclose(f) == 0 && ok;
    std::error_code ec;
    if (ok) fs::rename(tmp, path, ec);
    if (!ok || ec) {
      fs::remove(tmp, ec);
      return make_error("cannot store the document in %s (disk full?)", dir_.c_str());
    }
  }
  texts_.emplace(id, text);
  return id;
}

std::optional<std::string> DocumentStore::get(const std::string& id) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = texts_.find(id);
  if (it == texts_.end()) return std::nullopt;
  return it->second;
}

bool DocumentStore::remove(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!texts_.erase(id)) return false;
  if (!dir_.empty()) {
    std::error_code ec;
    fs::remove(dir_ + "/" + id + ".txt", ec);
  }
  return true;
}

size_t DocumentStore::size() const {
  std::lock_guard<std::mutex> lk(mu_);
  return texts_.size();
}

namespace {
ApiError bad(std::string msg, std::string param, std::string code = "invalid_value") {
  ApiError e;
  e.status = 400;
  e.message = std::move(msg);
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}
}  // namespace

std::optional<ApiError> parse_documents(const ojson& body, const DocumentStore* store, DocsField& out) {
  const bool has = body.contains("documents");
  for (const char* k : {"document_mode", "document_options", "document_prefix"})
    if (!has && body.contains(k)) return bad(std::string("'") + k + "' needs 'documents'", k);
  if (!has) return std::nullopt;
  const ojson& ds = body["documents"];
  if (!ds.is_array()) return bad("'documents' must be an array of {\"text\": ...} or {\"id\": ...}", "documents");
  if (ds.empty()) return bad("'documents' is empty", "documents");
  if (ds.size() > 256) return bad("at most 256 documents per request", "documents");
  out.present = true;
  for (size_t i = 0; i < ds.size(); ++i) {
    const std::string param = "documents[" + std::to_string(i) + "]";
    const ojson& d = ds[i];
    if (d.is_string()) {
      out.texts.push_back(d.get<std::string>());
    } else if (d.is_object() && d.contains("text") && d["text"].is_string() && !d.contains("id")) {
      out.texts.push_back(d["text"].get<std::string>());
    } else if (d.is_object() && d.contains("id") && d["id"].is_string() && !d.contains("text")) {
      const std::string id = d["id"].get<std::string>();
      auto t = store ? store->get(id) : std::nullopt;
      if (!t) {
        ApiError e = bad("The document '" + id + "' does not exist (store it with POST /v1/documents).", param + ".id",
                         "document_not_found");
        e.status = 404;
        return e;
      }
      out.texts.push_back(std::move(*t));
    } else {
      return bad("each document must be {\"text\": string} or {\"id\": string}", param);
    }
    if (out.texts.back().empty()) return bad("document " + std::to_string(i) + " is empty", param);
  }
  if (body.contains("document_mode")) {
    if (!body["document_mode"].is_string()) return bad("'document_mode' must be a string", "document_mode");
    auto m = docs::parse_mode(body["document_mode"].get<std::string>());
    if (!m.ok()) return bad(m.error(), "document_mode");
    out.params.mode = *m;
  }
  if (body.contains("document_options")) {
    const ojson& o = body["document_options"];
    if (!o.is_object()) return bad("'document_options' must be an object", "document_options");
    for (auto it = o.begin(); it != o.end(); ++it) {
      const std::string param = "document_options." + it.key();
      if (!it.value().is_number()) return bad("'" + param + "' must be a number", param);
      const double v = it.value().get<double>();
      if (it.key() == "ape_t") out.params.ape_t = static_cast<float>(v);
      else if (it.key() == "ape_s") out.params.ape_s = static_cast<float>(v);
      else if (it.key() == "blend_ratio") out.params.blend_ratio = static_cast<float>(v);
      else if (it.key() == "blend_layers") out.params.blend_layers = static_cast<int>(v);
      else if (it.key() == "link_k") out.params.link_k = static_cast<int>(v);
      else if (it.key() == "focus_budget") out.params.focus_budget = static_cast<float>(v);
      else if (it.key() == "focus_k") out.params.focus_k = static_cast<int>(v);
      else if (it.key() == "focus_rounds") out.params.focus_rounds = static_cast<int>(v);
      else
        return bad("unknown key '" + it.key() +
                       "' (ape_t, ape_s, blend_ratio, blend_layers, link_k, focus_budget, focus_k, focus_rounds)",
                   param);
    }
    Status st = out.params.validate();
    if (!st.ok()) return bad(st.error(), "document_options");
  }
  if (body.contains("document_prefix")) {
    if (!body["document_prefix"].is_string()) return bad("'document_prefix' must be a string", "document_prefix");
    out.prefix = body["document_prefix"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace larder::server
