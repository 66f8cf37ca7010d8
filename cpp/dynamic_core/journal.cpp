#include "journal.hpp"

#include "errors.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>

namespace dynamic_core {

namespace fs = std::filesystem;

const char* record_type_name(uint16_t t) {
  switch (static_cast<RecordType>(t)) {
    case RecordType::Meta: return "meta";
    case RecordType::Bars: return "bars";
    case RecordType::DeadLetter: return "dead_letter";
    case RecordType::Control: return "control";
    case RecordType::SignalHashes: return "signal_hashes";
    case RecordType::Instruments: return "instruments";
    case RecordType::Event: return "event";
  }
  return "unknown";
}

// ---- CRC32C ---------------------------------------------------------------------------------
namespace {

struct Crc32cTable {
  uint32_t t[8][256];
  Crc32cTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};
const Crc32cTable kCrc;

uint32_t crc32c_sw(uint32_t crc, const unsigned char* p, size_t n) {
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= crc;
    crc = kCrc.t[7][w & 0xff] ^ kCrc.t[6][(w >> 8) & 0xff] ^ kCrc.t[5][(w >> 16) & 0xff] ^
          kCrc.t[4][(w >> 24) & 0xff] ^ kCrc.t[3][(w >> 32) & 0xff] ^ kCrc.t[2][(w >> 40) & 0xff] ^
          kCrc.t[1][(w >> 48) & 0xff] ^ kCrc.t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ kCrc.t[0][(crc ^ *p++) & 0xff];
  return crc;
}

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
__attribute__((target("sse4.2"))) uint32_t crc32c_hw(uint32_t crc, const unsigned char* p, size_t n) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = __builtin_ia32_crc32di(c, w);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
const bool kHasSse42 = __builtin_cpu_supports("sse4.2");
#endif

}  // namespace

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
  crc = kHasSse42 ? crc32c_hw(crc, p, n) : crc32c_sw(crc, p, n);
#else
  crc = crc32c_sw(crc, p, n);
#endif
  return ~crc;
}

uint64_t fnv1a64(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

// ---- layout helpers ---------------------------------------------------------------------------
namespace {

void put32(char* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put16(char* p, uint16_t v) { std::memcpy(p, &v, 2); }
void put64(char* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t get32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint16_t get16(const char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint64_t get64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// A record header: the 20 bytes before header_crc, then their CRC.
void put_record_header(char* h, uint32_t n, uint16_t type, uint16_t flags, uint64_t seq, uint32_t payload_crc) {
  put32(h, n);
  put16(h + 4, type);
  put16(h + 6, flags);
  put64(h + 8, seq);
  put32(h + 16, payload_crc);
  put32(h + 20, crc32c(0, h, 20));
}

std::string segment_name(uint32_t k) {
  char b[32];
  std::snprintf(b, sizeof b, "seg-%06u.dcj", k);
  return b;
}

void sync_dir(const std::string& dir) {
  const int d = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (d >= 0) {
    ::fsync(d);
    ::close(d);
  }
}

}  // namespace

std::vector<std::string> journal_segments(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() == 14 && n.rfind("seg-", 0) == 0 && n.substr(10) == ".dcj" &&
        std::all_of(n.begin() + 4, n.begin() + 10, [](char c) { return c >= '0' && c <= '9'; }))
      out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// ---- writer -----------------------------------------------------------------------------------
JournalWriter::JournalWriter(const std::string& dir, const JournalIdentity& id, const void* meta,
                             size_t meta_n, int fsync_level, uint64_t segment_bytes)
    : dir_(dir), id_(id), level_(fsync_level), segment_bytes_(segment_bytes) {
  if (fsync_level < 0 || fsync_level > 2) throw std::invalid_argument("fsync level must be 0, 1 or 2");
  if (segment_bytes < (1u << 16)) throw std::invalid_argument("segment size must be at least 64 KiB");
  if (meta_n > kJournalMaxMeta)
    throw std::length_error("journal meta record of " + std::to_string(meta_n) + " bytes exceeds the limit of " +
                            std::to_string(kJournalMaxMeta) + " (the population is too large to journal)");
  std::error_code ec;
  // the directories this creates: at level 2 each one's entry in its parent is synced too, so
  // a power loss cannot take a new journal's directory (and with it every synced record)
  std::vector<fs::path> made;
  for (fs::path p = fs::absolute(dir_, ec); !ec && !p.empty() && !fs::exists(p, ec) && p != p.parent_path();
       p = p.parent_path())
    made.push_back(p);
  ec.clear();
  fs::create_directories(dir_, ec);
  if (ec) throw std::system_error(ec, "cannot create journal directory " + dir_);
  if (fsync_level >= 2)
    for (const fs::path& p : made) sync_dir(p.parent_path().string());
  if (!fs::is_directory(dir_, ec))
    throw std::system_error(std::make_error_code(std::errc::not_a_directory), "journal path " + dir_);
  if (!journal_segments(dir_).empty())
    throw std::invalid_argument("journal directory " + dir_ + " already holds a journal");
  if (fs::directory_iterator(dir_, ec) != fs::directory_iterator())
    throw std::invalid_argument("journal directory " + dir_ + " is not empty: give a new or empty directory "
                                "(a journal owns its directory)");
  lock_fd_ = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (lock_fd_ < 0) throw std::system_error(errno, std::generic_category(), "cannot open journal directory " + dir_);
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd_);
    lock_fd_ = -1;
    throw std::invalid_argument("journal directory " + dir_ + " is being written by another writer");
  }
  try {
    open_segment();
    append(RecordType::Meta, meta, meta_n);
    commit(true);
  } catch (...) {
    // Nothing half-made stays behind: no open file, no segment without its meta record.
    const bool made = fd_ >= 0 || failed();
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    closed_ = true;
    if (made) fs::remove(fs::path(dir_) / segment_name(0), ec);
    ::close(lock_fd_);
    lock_fd_ = -1;
    throw;
  }
}

JournalWriter::~JournalWriter() {
  try {
    close();
  } catch (...) {
  }
}

void JournalWriter::check_usable() const {
  if (failed()) throw JournalFailure("the journal in " + dir_ + " failed earlier (" + stats_.error + ") and takes no more records");
}

void JournalWriter::fail(const std::string& what, uint64_t keep) {
  // Cut the segment back to where the failed commit began, so the journal ends with the last
  // commit that succeeded; if even that fails, a reader sees a torn tail there (repair removes it).
  if (fd_ >= 0) {
    const int rc = ::ftruncate(fd_, static_cast<off_t>(keep));
    (void)rc;
  }
  buf_.clear();
  pending_ = 0;
  stats_.error = what;
  throw JournalFailure("journal write failed: " + what + "; the journal takes no more records (every commit before "
                       "it is intact and replays)");
}

void JournalWriter::open_segment() {
  if (fd_ >= 0) {
    if (level_ >= 1 && ::fdatasync(fd_) != 0) fail(std::string("sync failed: ") + std::strerror(errno), seg_size_);
    ::close(fd_);
    fd_ = -1;
    ++segment_;
  }
  const std::string path = (fs::path(dir_) / segment_name(segment_)).string();
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    const int e = errno;
    if (segment_ == 0) throw std::system_error(e, std::generic_category(), "cannot create journal segment " + path);
    fail("cannot create segment " + path + ": " + std::strerror(e), 0);
  }
  char h[kJournalFileHeader] = {};
  std::memcpy(h, kJournalMagic, 8);
  put32(h + 8, kJournalFormat);
  put32(h + 12, segment_);
  put64(h + 16, id_.population_hash);
  put64(h + 24, id_.config_hash);
  std::memcpy(h + 32, id_.build_id, sizeof id_.build_id);
  put32(h + 60, crc32c(0, h, 60));
  int err = write_all(h, sizeof h);
  if (!err && level_ >= 2 && ::fsync(fd_) != 0) err = errno;
  if (err) {  // a segment without its header holds nothing: it goes
    ::close(fd_);
    fd_ = -1;
    ::unlink(path.c_str());
    fail("cannot start segment " + path + ": " + std::strerror(err), 0);
  }
  if (level_ >= 2) sync_dir(dir_);
  seg_size_ = sizeof h;
  ++stats_.segments;
}

uint64_t JournalWriter::append(RecordType type, const void* data, size_t n, uint16_t flags) {
  if (closed_) throw std::logic_error("journal is closed");
  check_usable();
  const size_t limit = type == RecordType::Meta ? kJournalMaxMeta : kJournalMaxRecord;
  if (n > limit)
    throw std::length_error("journal record of " + std::to_string(n) + " bytes exceeds the limit of " +
                            std::to_string(limit));
  const uint64_t rec = kJournalRecordHeader + n;
  const uint64_t seq = ++seq_;
  const size_t at = buf_.size();
  buf_.resize(at + rec);
  char* p = buf_.data() + at;
  put_record_header(p, static_cast<uint32_t>(n), static_cast<uint16_t>(type), flags, seq, crc32c(0, data, n));
  if (n) std::memcpy(p + kJournalRecordHeader, data, n);
  ++pending_;
  return seq;
}

int JournalWriter::write_all(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    const ssize_t k = ::write(fd_, c, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (k == 0) return EIO;
    c += k;
    n -= static_cast<size_t>(k);
  }
  return 0;
}

void JournalWriter::commit(bool durable) {
  if (closed_) return;
  check_usable();
  const bool sync = durable && level_ >= 1;
  if (buf_.empty() && !sync) return;
  // A commit never spans segments: a batch is whole in one file or not there at all.
  if (!buf_.empty() && seg_size_ + buf_.size() > segment_bytes_ && seg_size_ > kJournalFileHeader) open_segment();
  const uint64_t begin = seg_size_;
  if (const int err = write_all(buf_.data(), buf_.size()))
    fail(std::string(std::strerror(err)) + " in " + dir_, begin);
  if (sync && (level_ == 1 ? ::fdatasync(fd_) : ::fsync(fd_)) != 0)
    fail(std::string("sync failed: ") + std::strerror(errno) + " in " + dir_, begin);
  if (!buf_.empty()) {
    seg_size_ = begin + buf_.size();
    stats_.bytes += buf_.size();
    stats_.records += pending_;
    ++stats_.commits;
    buf_.clear();
    pending_ = 0;
  }
  stats_.syncs += sync;
}

void JournalWriter::close() {
  if (closed_) return;
  closed_ = true;
  struct Unlock {  // the directory's lock goes last, whatever happens
    int& fd;
    ~Unlock() {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
  } unlock{lock_fd_};
  if (fd_ < 0) return;
  if (!failed()) {
    try {
      commit(true);
    } catch (...) {
      ::close(fd_);
      fd_ = -1;
      throw;
    }
  }
  ::close(fd_);
  fd_ = -1;
}

void JournalWriter::forget_after_fork() {
  closed_ = true;
  for (int* fd : {&fd_, &lock_fd_}) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
  pending_ = 0;
  buf_.clear();
}

bool journal_locked(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;  // nothing there to be written
  const bool locked = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);  // releases the shared lock if it was taken
  return locked;
}

// ---- reader -----------------------------------------------------------------------------------
JournalReader::JournalReader(const std::string& dir) : paths_(journal_segments(dir)) {
  for (const std::string& p : paths_) {
    std::error_code ec;
    const uint64_t n = fs::file_size(p, ec);  // a segment that is not a file counts 0 here
    if (!ec) total_ += n;
  }
  if (paths_.empty()) {
    rep_.status = ScanStatus::Empty;
    rep_.detail = "no journal segments in " + dir;
    done_ = true;
    return;
  }
  if (!open_next_segment()) done_ = true;
}

JournalReader::~JournalReader() {
  if (fd_ >= 0) ::close(fd_);
}

size_t JournalReader::read_at(uint64_t off, void* p, size_t n) const {
  char* c = static_cast<char*>(p);
  size_t got = 0;
  while (got < n) {
    const ssize_t k = ::pread(fd_, c + got, n - got, static_cast<off_t>(off + got));
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && !read_errno_) read_errno_ = errno;  // an error, not the end: never a torn tail
    if (k <= 0) break;
    got += static_cast<size_t>(k);
  }
  return got;
}

// Where the run of zero bytes that ends the current segment begins (its size when the last byte
// is not zero). Looks back at most 2 record limits; a longer run of zeros reads as starting there.
uint64_t JournalReader::zero_tail() const {
  if (zero_tail_ != UINT64_MAX) return zero_tail_;
  const uint64_t floor = size_ > 2ull * kJournalMaxRecord ? size_ - 2ull * kJournalMaxRecord : 0;
  char buf[1 << 16];
  uint64_t at = size_;
  while (at > floor) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(sizeof buf, at - floor));
    if (read_at(at - want, buf, want) != want) break;
    size_t i = want;
    while (i > 0 && buf[i - 1] == 0) --i;
    if (i > 0) {
      zero_tail_ = at - want + i;
      return zero_tail_;
    }
    at -= want;
  }
  zero_tail_ = at;
  return zero_tail_;
}

bool JournalReader::open_next_segment() {
  if (fd_ >= 0) {
    ::close(fd_);
    done_before_ += size_;
  }
  fd_ = -1;
  size_ = pos_ = 0;
  if (cur_ >= paths_.size()) return false;
  const std::string& path = paths_[cur_];
  rep_.segments = static_cast<uint32_t>(cur_ + 1);
  rep_.bad_segment = static_cast<uint32_t>(cur_);
  rep_.bad_offset = 0;
  read_errno_ = 0;
  auto bad = [&](ScanStatus s, const std::string& why) {
    rep_.status = read_errno_ ? ScanStatus::Unreadable : s;
    rep_.detail = read_errno_ ? "cannot read " + path + ": " + std::strerror(read_errno_) : why;
    return false;
  };
  // O_NONBLOCK: a FIFO named like a segment must not hang the reader before fstat refuses it.
  fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd_ < 0) return bad(ScanStatus::Unreadable, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return bad(ScanStatus::Unreadable, "cannot stat " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return bad(ScanStatus::Unreadable, path + " is not a regular file");
  size_ = static_cast<uint64_t>(st.st_size);
  zero_tail_ = UINT64_MAX;
  const bool last = cur_ + 1 == paths_.size();
  char h[kJournalFileHeader];
  if (size_ < kJournalFileHeader || read_at(0, h, sizeof h) != sizeof h)
    return bad(last ? ScanStatus::TornTail : ScanStatus::Corrupt, "segment " + path + " is shorter than its header");
  if (std::memcmp(h, kJournalMagic, 8) != 0 || get32(h + 60) != crc32c(0, h, 60))
    return bad(last && zero_tail() <= kJournalFileHeader ? ScanStatus::TornTail : ScanStatus::Corrupt,
               "bad segment header in " + path);
  const uint32_t fmt = get32(h + 8);
  if (fmt != kJournalFormat)
    return bad(ScanStatus::Unsupported, "journal format " + std::to_string(fmt) + " in " + path +
                                            " is not supported (this build reads format " +
                                            std::to_string(kJournalFormat) + ")");
  if (get32(h + 12) != cur_) {
    // segments are numbered from 0 without gaps: a file named for a later number means the
    // ones between are gone
    const std::string name = fs::path(path).filename().string();
    const unsigned long named = std::stoul(name.substr(4, 6));
    if (named != cur_)
      return bad(ScanStatus::Corrupt, "segment " + segment_name(static_cast<uint32_t>(cur_)) + " is missing from " +
                                          fs::path(path).parent_path().string() + " (the next file is " + name + ")");
    return bad(ScanStatus::Corrupt, "segment " + path + " says it is segment " + std::to_string(get32(h + 12)));
  }
  if (cur_ == 0) {
    rep_.format = fmt;
    rep_.identity.population_hash = get64(h + 16);
    rep_.identity.config_hash = get64(h + 24);
    std::memcpy(rep_.identity.build_id, h + 32, sizeof rep_.identity.build_id);
  } else if (get64(h + 16) != rep_.identity.population_hash || get64(h + 24) != rep_.identity.config_hash ||
             std::memcmp(h + 32, rep_.identity.build_id, sizeof rep_.identity.build_id) != 0) {
    // one writer writes every segment of a journal with the same identity
    return bad(ScanStatus::Corrupt, "segment " + path + " belongs to another journal (its header's population hash, "
                                    "config hash or build id differs from segment 0's)");
  }
  pos_ = kJournalFileHeader;
  return true;
}

bool JournalReader::next(JournalRecord& r) {
  while (!done_) {
    if (pos_ == size_) {  // end of this segment
      ++cur_;
      if (!open_next_segment()) {
        done_ = true;
        return false;
      }
      continue;
    }
    const bool last = cur_ + 1 == paths_.size();
    const uint64_t left = size_ - pos_;
    auto fail = [&](ScanStatus s, const std::string& why) {
      rep_.status = read_errno_ ? ScanStatus::Unreadable : s;
      rep_.bad_segment = static_cast<uint32_t>(cur_);
      rep_.bad_offset = pos_;
      rep_.detail = read_errno_ ? "cannot read " + paths_[cur_] + " near offset " + std::to_string(pos_) + ": " +
                                      std::strerror(read_errno_)
                                : why + " at " + paths_[cur_] + " offset " + std::to_string(pos_);
      done_ = true;
      return false;
    };
    const ScanStatus cut = last ? ScanStatus::TornTail : ScanStatus::Corrupt;
    char h[kJournalRecordHeader];
    if (left < kJournalRecordHeader || read_at(pos_, h, sizeof h) != sizeof h)
      return fail(cut, "truncated record header");
    // zeros from somewhere inside the record (or before) to the end: blocks a crash left unwritten
    auto torn_if_zeros_from = [&](uint64_t end) {
      return last && zero_tail() <= end ? ScanStatus::TornTail : ScanStatus::Corrupt;
    };
    if (get32(h + 20) != crc32c(0, h, 20))
      return fail(torn_if_zeros_from(pos_ + kJournalRecordHeader), "record header CRC mismatch");
    const uint32_t n = get32(h);
    const uint16_t type = get16(h + 4);
    const uint16_t flags = get16(h + 6);
    const uint64_t seq = get64(h + 8);
    const uint32_t limit = static_cast<RecordType>(type) == RecordType::Meta ? kJournalMaxMeta : kJournalMaxRecord;
    if (n > limit) return fail(ScanStatus::Corrupt, "record length " + std::to_string(n) + " over the limit");
    if (left < kJournalRecordHeader + n) return fail(cut, "truncated record");
    std::string& payload = r.payload;  // the caller's buffer, its capacity kept from record to record
    payload.resize(n);
    if (read_at(pos_ + kJournalRecordHeader, payload.data(), n) != n) return fail(cut, "truncated record");
    if (crc32c(0, payload.data(), n) != get32(h + 16)) {
      const bool at_end = left == kJournalRecordHeader + n;
      return fail(last && at_end ? ScanStatus::TornTail : torn_if_zeros_from(pos_ + kJournalRecordHeader + n),
                  "payload CRC mismatch");
    }
    if (seq != rep_.last_seq + 1)
      return fail(ScanStatus::Corrupt, "sequence " + std::to_string(seq) + " after " + std::to_string(rep_.last_seq));
    r.type = type;
    r.flags = flags;
    r.seq = seq;
    r.segment = static_cast<uint32_t>(cur_);
    r.offset = pos_;
    pos_ += kJournalRecordHeader + n;
    rep_.last_seq = seq;
    ++rep_.records;
    return true;
  }
  return false;
}

ScanReport scan_journal(const std::string& dir, bool repair,
                        const std::function<void(uint64_t, uint64_t)>& progress) {
  JournalReader rd(dir);
  JournalRecord r;
  const uint64_t step = journal_progress_step(rd.bytes_total());
  uint64_t next_call = step;
  while (rd.next(r)) {
    if (progress && rd.bytes_done() >= next_call) {
      progress(rd.bytes_done(), std::max(rd.bytes_total(), rd.bytes_done()));
      next_call = rd.bytes_done() + step;
    }
  }
  if (progress) progress(std::max(rd.bytes_total(), rd.bytes_done()), std::max(rd.bytes_total(), rd.bytes_done()));
  ScanReport rep = rd.report();
  if (repair && rep.status == ScanStatus::TornTail) {
    if (journal_locked(dir))
      throw JournalFailure("journal " + dir + " is open for writing (a run is still writing it): its tail is a "
                           "record being written, not a torn one; repair it after the writer has stopped");
    const std::string& path = rd.segment_paths()[rep.bad_segment];
    std::error_code ec;
    const uint64_t size = fs::file_size(path, ec);
    if (rep.bad_offset < kJournalFileHeader) {
      // A segment cut inside its own header holds nothing: remove it.
      fs::remove(path, ec);
      if (ec) throw std::system_error(ec, "cannot remove torn segment " + path);
    } else {
      fs::resize_file(path, rep.bad_offset, ec);
      if (ec) throw std::system_error(ec, "cannot truncate torn tail of " + path);
    }
    rep.truncated_bytes = size - std::min<uint64_t>(size, rep.bad_offset);
    rep.repaired = true;
  }
  return rep;
}

}  // namespace dynamic_core
