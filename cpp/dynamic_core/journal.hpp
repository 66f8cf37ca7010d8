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
// Flags: kRecordContinues marks a Bars record that continues the previous one (a batch split to
// keep records under the size limit), so a Withdrawn record applies to the whole batch.
//
// Durability: records are buffered in memory; commit() writes the buffer with write(2) and then,
// when asked for a durable commit, syncs by level: 0 leaves it to the OS, 1 fdatasync()s the
// data, 2 fsync()s data and metadata (and the directory when a segment is created). A failed
// write or sync is final: the writer cuts the segment back to its last complete commit (best
// effort), keeps the reason, and refuses everything after with JournalFailure, so the journal
// on disk always ends at a record boundary and never holds a record twice.
//
// Recovery: a reader walks every record checking framing and CRCs, reading one record at a time
// (memory is bounded by the record size limit, whatever the file). In the last segment, a record
// whose header or payload runs past the end of the file, whose payload CRC fails while it ends
// exactly at the end of the file, or a header that fails its CRC where every byte from there to
// the end is zero (blocks a crash left unwritten), is a torn tail: scan(repair=true) truncates
// it. Any other failure is corruption, reported with its segment and byte offset.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dynamic_core {

inline constexpr uint32_t kJournalFormat = 2;  // 1: 20-byte record headers, length not under a CRC
inline constexpr size_t kJournalFileHeader = 64;
inline constexpr size_t kJournalRecordHeader = 24;
inline constexpr uint32_t kJournalMaxRecord = 64u << 20;  // bytes of payload
inline constexpr uint32_t kJournalMaxMeta = 1u << 30;     // the Meta record (a whole population)
inline constexpr uint16_t kRecordContinues = 1;           // flag: continues the previous Bars record
inline constexpr char kJournalMagic[8] = {'D', 'C', 'J', 'R', 'N', 'L', '0', '1'};

enum class RecordType : uint16_t {
  Meta = 1,          // owner-defined (population, config, instruments)
  Bars = 2,          // accepted bars (raw Bar structs), journaled before they are processed
  Withdrawn = 3,     // u64: the last k bars of the previous Bars record were not taken (reject_new)
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
};

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
  bool closed() const { return fd_ < 0; }
  bool failed() const { return !error_.empty(); }
  const std::string& error() const { return error_; }
  const JournalStats& stats() const { return stats_; }
  int fsync_level() const { return level_; }
  const std::string& dir() const { return dir_; }

 private:
  void open_segment();
  void write_all(const void* p, size_t n);
  void check_usable() const;
  [[noreturn]] void fail(const std::string& what);

  std::string dir_;
  JournalIdentity id_;
  int level_;
  uint64_t segment_bytes_;
  int fd_ = -1;
  uint32_t segment_ = 0;
  uint64_t seg_size_ = 0;
  uint64_t seq_ = 0;
  std::vector<char> buf_;
  JournalStats stats_;
  std::string error_;  // why the writer failed; empty while it works
};

struct JournalRecord {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint64_t seq = 0;
  uint32_t segment = 0;
  uint64_t offset = 0;  // of the record header within its segment file
  std::string payload;
};

enum class ScanStatus : uint32_t { Ok = 0, TornTail = 1, Corrupt = 2, Empty = 3 };

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

 private:
  bool open_next_segment();
  size_t read_at(uint64_t off, void* p, size_t n) const;
  bool zeros_to_end(uint64_t from) const;
  std::vector<std::string> paths_;
  size_t cur_ = 0;
  int fd_ = -1;        // the current segment file
  uint64_t size_ = 0;  // its size when opened
  uint64_t pos_ = 0;
  bool done_ = false;
  ScanReport rep_;
};

// Walks the whole journal; with repair, truncates a torn tail so the journal can be appended to
// and replayed.
ScanReport scan_journal(const std::string& dir, bool repair);

// Lists the segment files of `dir` in order (empty when none).
std::vector<std::string> journal_segments(const std::string& dir);

// 64-bit FNV-1a over `n` bytes: the signal hash journaled for replay verification.
uint64_t fnv1a64(const void* data, size_t n);

}  // namespace dynamic_core
