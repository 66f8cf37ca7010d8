// The append-only journal: every accepted input, control command and dead letter, and the hash
// of every signal handed out, in order, so that a run can be replayed bit for bit.
//
// On disk: a directory of segment files `seg-NNNNNN.dcj`. Each segment starts with a fixed
// 64-byte file header (magic "DCJRNL01", format version, segment index, population hash, engine
// config hash, build id, CRC32C of the first 60 bytes) followed by records. A record is
//
//   u32 length | u16 type | u16 flags | u64 seq | u32 payload_crc | u32 header_crc | payload
//
// little-endian, where seq numbers the records of the whole journal from 1, payload_crc is the
// CRC32C (Castagnoli) of the payload and header_crc that of the 20 header bytes before it (so
// the length is covered: a flipped length bit is corruption, never a "torn tail"). The first
// record of segment 0 is a Meta record whose payload the writer's owner chooses (the Python
// engine stores the population, the engine configuration and the instrument names there).
// Flags: kRecordMore says the next record belongs to the same batch (the engine journals a
// batch's accepted bars, split to keep records under the size limit, and its dead letters as
// one commit); replay takes a batch only once its last record is there.
//
// Durability: records are buffered in memory; commit() writes the buffer with write(2) and then,
// when asked for a durable commit, syncs by level: 0 leaves it to the OS, 1 fdatasync()s the
// data, 2 fsync()s data and metadata (and the directory when a segment is created). A commit
// never spans segments: the writer starts a new one before a commit that would overflow the
// current one (a single commit larger than the segment size makes a larger segment). A failed
// write or sync is final: the writer cuts the segment back to where the failed commit began
// (best effort), keeps the reason, and refuses everything after with JournalFailure, so the
// journal on disk ends with the last commit that succeeded.
//
// Recovery: a reader walks every record checking framing and CRCs, reading one record at a time
// (memory is bounded by the record size limit, whatever the file). In the last segment, a bad
// record is a torn tail (a write a crash cut short) when its header or payload runs past the end
// of the file, when its payload CRC fails and it ends exactly at the end of the file, or when
// every byte from somewhere inside it (or its header) to the end of the file is zero (blocks a
// crash left unwritten); a last segment whose header is torn that way is torn too.
// scan(repair=true) truncates a torn tail (or removes a torn segment). Any other failure is
// corruption, reported with its segment and byte offset; a segment of another format version is
// Unsupported.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dynamic_core {

inline constexpr uint32_t kJournalFormat = 2;  // 1: 20-byte record headers, length not under a CRC
inline constexpr size_t kJournalFileHeader = 64;
inline constexpr size_t kJournalRecordHeader = 24;
inline constexpr uint32_t kJournalMaxRecord = 64u << 20;  // bytes of payload
inline constexpr uint32_t kJournalMaxMeta = 1u << 30;     // the Meta record (a whole population)
inline constexpr uint16_t kRecordMore = 1;                // flag: the next record is of the same batch
inline constexpr char kJournalMagic[8] = {'D', 'C', 'J', 'R', 'N', 'L', '0', '1'};

enum class RecordType : uint16_t {
  Meta = 1,          // owner-defined (population, config, instruments)
  Bars = 2,          // accepted bars (raw Bar structs), journaled before they are processed
  // 3: format 1's Withdrawn; format 2 journals only the bars a batch takes
  DeadLetter = 4,    // rejected bars: (Bar, u32 reason, u32 pad) each
  Control = 5,       // owner-encoded control command, applied between updates
  SignalHashes = 6,  // (u64 seq, u64 hash) pairs of signals handed out
  Instruments = 7,   // owner-encoded instrument names registered since the last such record
  Event = 8,         // owner-encoded (evolution and other events)
};
const char* record_type_name(uint16_t t);

// CRC32C (Castagnoli); hardware instruction where the CPU has it.
uint32_t crc32c(uint32_t crc, const void* data, size_t n);

struct JournalIdentity {
  uint64_t population_hash = 0;
  uint64_t config_hash = 0;
  char build_id[24] = {};
};

struct JournalStats {
  uint64_t records = 0;
  uint64_t bytes = 0;
  uint64_t commits = 0;
  uint64_t syncs = 0;
  uint32_t segments = 0;
  std::string error;  // why the writer failed; empty while it works
};

// Whether a writer has the journal in `dir` open now (it holds an exclusive flock() on the
// directory from creation to close). Repair refuses such a journal: its "torn tail" is a record
// still being written.
bool journal_locked(const std::string& dir);

class JournalWriter {
 public:
  // Creates `dir` (if needed) and a new journal in it; throws if it already holds segments.
  JournalWriter(const std::string& dir, const JournalIdentity& id, const void* meta, size_t meta_n,
                int fsync_level, uint64_t segment_bytes);
  ~JournalWriter();
  JournalWriter(const JournalWriter&) = delete;
  JournalWriter& operator=(const JournalWriter&) = delete;

  // Buffers one record; returns its sequence number. Throws std::length_error past the limit,
  // JournalFailure once the writer has failed.
  uint64_t append(RecordType type, const void* data, size_t n, uint16_t flags = 0);
  // Writes the buffer; with durable, syncs by the fsync level. A failed write or sync throws
  // JournalFailure and fails the writer for good (see the file comment).
  void commit(bool durable);
  // Commits and closes; a failed writer just closes its file.
  void close();
  // In a child made by fork(): closes this process's copies of the file and of the locked
  // directory, writing nothing (the buffer and the journal are the parent's). Otherwise the
  // child would hold the directory's flock() (shared with the parent's descriptor) until it
  // exits, and the journal would look open for writing after the parent closed it.
  void forget_after_fork();
  bool closed() const { return closed_; }
  bool failed() const { return !stats_.error.empty(); }
  const std::string& error() const { return stats_.error; }
  const JournalStats& stats() const { return stats_; }
  int fsync_level() const { return level_; }
  const std::string& dir() const { return dir_; }

 private:
  void open_segment();
  int write_all(const void* p, size_t n);  // 0, or the errno of the failure
  void check_usable() const;
  [[noreturn]] void fail(const std::string& what, uint64_t keep);

  std::string dir_;
  JournalIdentity id_;
  int level_;
  uint64_t segment_bytes_;
  int fd_ = -1;
  int lock_fd_ = -1;  // the directory, flock()ed while this writer has it open (see journal_locked)
  bool closed_ = false;
  uint32_t pending_ = 0;  // records in buf_
  uint32_t segment_ = 0;
  uint64_t seg_size_ = 0;
  uint64_t seq_ = 0;
  std::vector<char> buf_;
  JournalStats stats_;
};

struct JournalRecord {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint64_t seq = 0;
  uint32_t segment = 0;
  uint64_t offset = 0;  // of the record header within its segment file
  std::string payload;
};

// Unreadable: a segment could not be opened or read (permissions, an I/O error, not a regular
// file): nothing is known to be wrong with the records, and repair never touches it.
enum class ScanStatus : uint32_t { Ok = 0, TornTail = 1, Corrupt = 2, Empty = 3, Unsupported = 4, Unreadable = 5 };

struct ScanReport {
  ScanStatus status = ScanStatus::Ok;
  uint64_t records = 0;
  uint64_t last_seq = 0;
  uint32_t segments = 0;
  uint32_t bad_segment = 0;
  uint64_t bad_offset = 0;  // where the torn or corrupt record starts
  uint64_t truncated_bytes = 0;  // removed by repair
  bool repaired = false;
  std::string detail;
  JournalIdentity identity;
  uint32_t format = 0;
};

// Reads records in order. next() returns false at the end or at the first bad record; report()
// then says which.
class JournalReader {
 public:
  explicit JournalReader(const std::string& dir);
  ~JournalReader();
  JournalReader(const JournalReader&) = delete;
  JournalReader& operator=(const JournalReader&) = delete;
  bool next(JournalRecord& r);
  const ScanReport& report() const { return rep_; }
  const std::vector<std::string>& segment_paths() const { return paths_; }
  // Bytes read so far (the segments before the current one and the records of this one) and the
  // segments' total size when the reader was made: for a progress display.
  uint64_t bytes_done() const { return done_before_ + pos_; }
  uint64_t bytes_total() const { return total_; }

 private:
  bool open_next_segment();
  size_t read_at(uint64_t off, void* p, size_t n) const;
  uint64_t zero_tail() const;
  std::vector<std::string> paths_;
  size_t cur_ = 0;
  int fd_ = -1;        // the current segment file
  uint64_t size_ = 0;  // its size when opened
  uint64_t pos_ = 0;
  mutable uint64_t zero_tail_ = UINT64_MAX;  // where the last segment's run of trailing zeros begins
  mutable int read_errno_ = 0;  // the first error a read of the current segment met (0: none)
  uint64_t done_before_ = 0;    // sizes of the segments before the current one
  uint64_t total_ = 0;          // listed sizes of every segment
  bool done_ = false;
  ScanReport rep_;
};

// Bytes between progress calls over a journal of `total` bytes (scan_journal, and the Python
// reader's read/replay): every 1%, so a slow consumer of a small journal still moves, and at
// most 8 MB apart.
inline uint64_t journal_progress_step(uint64_t total) {
  return std::clamp<uint64_t>(total / 100, 1, uint64_t{8} << 20);
}

// Walks the whole journal; with repair, truncates a torn tail so the journal can be appended to
// and replayed. `progress` (optional) is called with (bytes done, bytes in all) every
// journal_progress_step bytes and once at the end; what it throws ends the scan (before any
// repair).
ScanReport scan_journal(const std::string& dir, bool repair,
                        const std::function<void(uint64_t, uint64_t)>& progress = {});

// Lists the segment files of `dir` in order (empty when none).
std::vector<std::string> journal_segments(const std::string& dir);

// 64-bit FNV-1a over `n` bytes: the signal hash journaled for replay verification.
uint64_t fnv1a64(const void* data, size_t n);

}  // namespace dynamic_core
