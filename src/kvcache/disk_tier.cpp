#include "kvcache/disk_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <type_traits>

namespace larder::kvcache {

namespace {

constexpr uint32_t kMagic = 0x52564B4C;  // "LKVR"
constexpr uint16_t kVersion = 1;
constexpr uint32_t kMaxPayload = 256u << 20;
constexpr uint16_t kFlagTombstone = 1;  // remove(): hides earlier records of the key

struct RecHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t flags;
  uint64_t key_lo, key_hi;
  uint64_t layout;
  uint32_t length;
  uint32_t reserved;
  uint64_t payload_checksum;
  uint64_t header_checksum;  // XXH3-64 of all bytes before this field
  uint64_t pad;
};
static_assert(sizeof(RecHeader) == 64);

uint64_t header_sum(const RecHeader& h) { return XXH3_64bits(&h, offsetof(RecHeader, header_checksum)); }

// pread/pwrite until n bytes are done (short transfers and EINTR retried).
template <class Buf, class Op>
bool io_full(int fd, Buf* buf, size_t n, uint64_t off, Op op) {
  auto* p = reinterpret_cast<std::conditional_t<std::is_const_v<Buf>, const uint8_t, uint8_t>*>(buf);
  while (n > 0) {
    ssize_t r = op(fd, p, n, static_cast<off_t>(off));
    if (r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return true;
}
bool read_full(int fd, void* buf, size_t n, uint64_t off) { return io_full(fd, buf, n, off, ::pread); }
bool write_full(int fd, const void* buf, size_t n, uint64_t off) { return io_full(fd, buf, n, off, ::pwrite); }

// Calls fn(header, payload_offset, valid) for each record; stops at a torn tail.
template <class F>
int64_t walk_segment(int fd, uint64_t file_size, F&& fn) {
  int64_t corrupt = 0;
  uint64_t off = 0;
  while (off < file_size) {
    RecHeader h;
    if (file_size - off < sizeof h || !read_full(fd, &h, sizeof h, off)) return corrupt + 1;  // torn header
    if (h.magic != kMagic || h.version != kVersion || h.header_checksum != header_sum(h) || h.length > kMaxPayload)
      return corrupt + 1;  // no trustworthy length: the rest of the segment is unreadable
    if (file_size - off - sizeof h < h.length) return corrupt + 1;  // torn payload
    fn(h, off + sizeof h);
    off += sizeof h + h.length;
  }
  return corrupt;
}

}  // namespace

std::string DiskTier::segment_name(uint32_t id) {
  char name[32];
  std::snprintf(name, sizeof name, "/seg-%08u.lkv", id);
  return name;
}

std::string DiskTier::seg_path(uint32_t id) const { return dir_ + segment_name(id); }

Result<std::vector<uint32_t>> DiskTier::segment_ids(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return make_error("cannot read KV directory '%s': %s", dir.c_str(), std::strerror(errno));
  std::vector<uint32_t> ids;
  while (dirent* e = ::readdir(d)) {
    unsigned id;
    char tail[8];
    if (std::sscanf(e->d_name, "seg-%8u.%3s", &id, tail) == 2 && std::strcmp(tail, "lkv") == 0) ids.push_back(id);
  }
  ::closedir(d);
  std::sort(ids.begin(), ids.end());
  return ids;
}

Result<std::unique_ptr<DiskTier>> DiskTier::open(const std::string& dir, uint64_t capacity_bytes,
                                                 uint64_t layout_fingerprint, uint64_t segment_bytes) {
  if (dir.empty()) return make_error("no KV directory given");
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return make_error("cannot create KV directory '%s': %s", dir.c_str(), std::strerror(errno));
  if (::access(dir.c_str(), R_OK | W_OK | X_OK) != 0)
    return make_error("KV directory '%s' is not writable: %s", dir.c_str(), std::strerror(errno));
  if (capacity_bytes < 1024 || segment_bytes < 4096) return make_error("KV disk capacity too small");
  auto t = std::unique_ptr<DiskTier>(new DiskTier(dir, capacity_bytes, layout_fingerprint,
                                                  std::min<uint64_t>(segment_bytes, capacity_bytes)));
  LARDER_CHECK_STATUS(t->scan());
  return t;
}

DiskTier::~DiskTier() {
  if (cur_fd_ >= 0) {
    ::fsync(cur_fd_);
    ::close(cur_fd_);
  }
}

Status DiskTier::scan() {
  LARDER_TRY(ids, segment_ids(dir_));
  for (uint32_t id : ids) {
    int fd = ::open(seg_path(id).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat sb {};
    ::fstat(fd, &sb);
    const uint64_t size = static_cast<uint64_t>(sb.st_size);
    st_.corrupt_records += walk_segment(fd, size, [&](const RecHeader& h, uint64_t poff) {
      if (h.layout != layout_) return;  // another model/shape: never served
      if (h.flags & kFlagTombstone) {
        index_.erase(BlockHash{h.key_lo, h.key_hi});
        return;
      }
      // Headers are checksummed and lengths checked against the file; payloads are
      // verified on every read instead of here, so a restart over many GB is quick.
      index_[BlockHash{h.key_lo, h.key_hi}] = Loc{id, poff, h.length, h.payload_checksum};
    });
    ::close(fd);
    segments_[id] = size;
    cur_seg_ = std::max(cur_seg_, id);
  }
  // Always continue in a fresh segment: never append after a possibly torn tail.
  cur_seg_ = ids.empty() ? 0 : cur_seg_;
  evict_to(capacity_);
  return Status::Ok();
}

Status DiskTier::roll_segment() {
  if (cur_fd_ >= 0) {
    ::fsync(cur_fd_);
    // The page cache must not become a hidden, unbounded DRAM tier: a full segment
    // leaves memory once it is durable (reads below drop what they pulled in, too).
    ::posix_fadvise(cur_fd_, 0, 0, POSIX_FADV_DONTNEED);
    ::close(cur_fd_);
    cur_fd_ = -1;
  }
  ++cur_seg_;
  cur_fd_ = ::open(seg_path(cur_seg_).c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (cur_fd_ < 0) return make_error("cannot create KV segment: %s", std::strerror(errno));
  cur_size_ = 0;
  segments_[cur_seg_] = 0;
  return Status::Ok();
}

void DiskTier::evict_to(uint64_t bytes) {
  uint64_t total = 0;
  for (auto& [id, b] : segments_) total += b;
  while (total > bytes && segments_.size() > 1) {
    auto oldest = segments_.begin();
    if (oldest->first == cur_seg_ && cur_fd_ >= 0) break;
    const uint32_t id = oldest->first;
    for (auto it = index_.begin(); it != index_.end();) {
      if (it->second.segment == id) {
        if (listener_) listener_->removed(Medium::Disk, it->first);
        it = index_.erase(it);
        st_.evicted_blocks++;
      } else {
        ++it;
      }
    }
    total -= oldest->second;
    ::unlink(seg_path(id).c_str());
    segments_.erase(oldest);
  }
}

Status DiskTier::put(const BlockHash& key, std::span<const uint8_t> payload) {
  std::lock_guard<std::mutex> lk(mu_);
  return append(key, payload, 0);
}

Status DiskTier::fail_write(Error e) {
  st_.disabled = true;
  st_.write_errors++;
  retry_at_ = std::chrono::steady_clock::now() + retry_after_;
  return e;
}

Status DiskTier::append(const BlockHash& key, std::span<const uint8_t> payload, uint16_t flags) {
  if (st_.disabled && std::chrono::steady_clock::now() < retry_at_)
    return make_error("KV disk tier is disabled after an earlier write error (retried in at most %lld s)",
                      static_cast<long long>(std::chrono::duration_cast<std::chrono::seconds>(retry_after_).count()));
  if (payload.size() > kMaxPayload) return make_error("KV block of %zu bytes is too large", payload.size());
  const uint64_t rec = sizeof(RecHeader) + payload.size();
  if (cur_fd_ < 0 || cur_size_ + rec > segment_bytes_) {
    Status st = roll_segment();
    if (!st.ok()) return fail_write(st.take_error());
  }
  RecHeader h{};
  h.magic = kMagic;
  h.version = kVersion;
  h.flags = flags;
  h.key_lo = key.lo;
  h.key_hi = key.hi;
  h.layout = layout_;
  h.length = static_cast<uint32_t>(payload.size());
  h.payload_checksum = XXH3_64bits(payload.data(), payload.size());
  h.header_checksum = header_sum(h);
  std::vector<uint8_t> buf(rec);
  std::memcpy(buf.data(), &h, sizeof h);
  // A tombstone's payload is empty and may have no data() at all (memcpy from null is undefined).
  if (!payload.empty()) std::memcpy(buf.data() + sizeof h, payload.data(), payload.size());
  if (!write_full(cur_fd_, buf.data(), buf.size(), cur_size_)) {
    const int e = errno;
    // Disk full or I/O error: the torn tail is skipped at the next open (or overwritten by the
    // retry: cur_size_ did not move); the tier turns itself off for a while and serving goes on.
    return fail_write(make_error("KV disk write failed (%s); disk tier disabled for %lld s", std::strerror(e),
                                 static_cast<long long>(
                                     std::chrono::duration_cast<std::chrono::seconds>(retry_after_).count())));
  }
  st_.disabled = false;
  // Visible only now that the whole record is written.
  if (flags & kFlagTombstone) {
    if (index_.erase(key) && listener_) listener_->removed(Medium::Disk, key);
  } else {
    index_[key] = Loc{cur_seg_, cur_size_ + sizeof h, h.length, h.payload_checksum};
    st_.puts++;
    if (listener_) listener_->stored(Medium::Disk, key, nullptr, {});
  }
  cur_size_ += rec;
  segments_[cur_seg_] = cur_size_;
  evict_to(capacity_);
  return Status::Ok();
}

bool DiskTier::get(const BlockHash& key, std::vector<uint8_t>& out) {
  Loc loc;
  std::string path;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = index_.find(key);
    if (it == index_.end()) {
      st_.misses++;
      return false;
    }
    loc = it->second;
    path = seg_path(loc.segment);
  }
  // The read runs outside the lock so readers overlap each other and the writer. A
  // segment evicted meanwhile fails to open: a miss.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  bool ok = fd >= 0;
  RecHeader h{};
  if (ok) ok = read_full(fd, &h, sizeof h, loc.offset - sizeof h);
  ok = ok && h.magic == kMagic && h.header_checksum == header_sum(h) && h.key_lo == key.lo && h.key_hi == key.hi &&
       h.layout == layout_ && h.length == loc.length;
  if (ok) {
    out.resize(loc.length);
    ok = read_full(fd, out.data(), loc.length, loc.offset) && XXH3_64bits(out.data(), loc.length) == loc.checksum;
  }
  if (fd >= 0) {
    ::posix_fadvise(fd, static_cast<off_t>(loc.offset - sizeof h), static_cast<off_t>(loc.length + sizeof h),
                    POSIX_FADV_DONTNEED);
    ::close(fd);
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (!ok) {
    // Flipped bits or a truncated file: a miss (recompute), never a wrong block.
    auto it = index_.find(key);
    const bool still = it != index_.end() && it->second.segment == loc.segment && it->second.offset == loc.offset;
    if (still) {
      st_.corrupt_records++;
      if (listener_) listener_->removed(Medium::Disk, key);
      index_.erase(it);
    }
    st_.misses++;
    return false;
  }
  st_.hits++;
  return true;
}

std::vector<BlockHash> DiskTier::keys() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<BlockHash> out;
  out.reserve(index_.size());
  for (const auto& [k, loc] : index_) out.push_back(k);
  return out;
}

void DiskTier::set_listener(BlockListener* l) {
  std::lock_guard<std::mutex> lk(mu_);
  listener_ = l;
}

bool DiskTier::exists(const BlockHash& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  return index_.count(key) != 0;
}

void DiskTier::remove(const BlockHash& key) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!index_.count(key)) return;
  index_.erase(key);
  if (listener_) listener_->removed(Medium::Disk, key);
  // Persist the removal; if the tier is off, the stale record may reappear after a
  // restart, which is harmless (it is still the correct KV for that key).
  (void)append(key, {}, kFlagTombstone);
}

Status DiskTier::flush() {
  std::lock_guard<std::mutex> lk(mu_);
  if (cur_fd_ >= 0 && ::fsync(cur_fd_) != 0) return make_error("fsync of the KV segment failed: %s", std::strerror(errno));
  return Status::Ok();
}

DiskTierStats DiskTier::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  DiskTierStats s = st_;
  s.blocks = static_cast<int64_t>(index_.size());
  s.segments = static_cast<int64_t>(segments_.size());
  s.bytes = 0;
  for (auto& [id, b] : segments_) s.bytes += static_cast<int64_t>(b);
  return s;
}

Result<DiskTierStats> DiskTier::verify() const {
  std::lock_guard<std::mutex> lk(mu_);
  return inspect(dir_, /*check_payloads=*/true);
}

Result<DiskTierStats> DiskTier::inspect(const std::string& dir, bool check_payloads, std::map<uint64_t, int64_t>* layouts) {
  LARDER_TRY(ids, segment_ids(dir));
  DiskTierStats s;
  std::vector<uint8_t> buf;
  for (uint32_t id : ids) {
    const std::string path = dir + segment_name(id);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return make_error("cannot open segment %s: %s", path.c_str(), std::strerror(errno));
    struct stat sb {};
    ::fstat(fd, &sb);
    s.corrupt_records += walk_segment(fd, static_cast<uint64_t>(sb.st_size), [&](const RecHeader& h, uint64_t poff) {
      if (check_payloads) {
        buf.resize(h.length);
        if (!read_full(fd, buf.data(), h.length, poff) || XXH3_64bits(buf.data(), h.length) != h.payload_checksum) {
          s.corrupt_records++;
          return;
        }
      }
      if (!(h.flags & kFlagTombstone)) {
        s.blocks++;
        if (layouts) (*layouts)[h.layout]++;
      }
    });
    s.bytes += sb.st_size;
    s.segments++;
    ::close(fd);
  }
  return s;
}

Status DiskTier::clear() {
  std::lock_guard<std::mutex> lk(mu_);
  if (cur_fd_ >= 0) {
    ::close(cur_fd_);
    cur_fd_ = -1;
  }
  int failed = 0;
  for (auto& [id, b] : segments_)
    if (::unlink(seg_path(id).c_str()) != 0 && errno != ENOENT) failed++;
  segments_.clear();
  index_.clear();
  if (failed) return make_error("%d KV segment file(s) could not be removed", failed);
  return Status::Ok();
}

}  // namespace larder::kvcache
