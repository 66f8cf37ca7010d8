// The journal writer and reader alone: framing, CRC32C, segment rollover, torn tail and repair,
// corruption with its offset, a failed write, files that are not segments.
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "check.hpp"
#include "dynamic_core/errors.hpp"
#include "dynamic_core/journal.hpp"

using namespace dynamic_core;
namespace fs = std::filesystem;

// An I/O error on demand: this program's own pread (the reader's only read call) fails with EIO
// for any read reaching past g_eio_from while that is set, the way a bad disk block does; else
// it is the system call. (A definition here takes precedence over the C library's for the
// journal code linked into this program.)
namespace {
long long g_eio_from = -1;
ssize_t pread_or_eio(int fd, void* buf, size_t n, off_t off) {
  if (g_eio_from >= 0 && static_cast<long long>(off) + static_cast<long long>(n) > g_eio_from) {
    errno = EIO;
    return -1;
  }
  return static_cast<ssize_t>(::syscall(SYS_pread64, fd, buf, n, off));
}
}  // namespace
extern "C" ssize_t pread(int fd, void* buf, size_t n, off_t off) { return pread_or_eio(fd, buf, n, off); }
extern "C" ssize_t pread64(int fd, void* buf, size_t n, off_t off) { return pread_or_eio(fd, buf, n, off); }

namespace {

std::vector<JournalRecord> read_all(const std::string& dir, ScanReport& rep) {
  JournalReader rd(dir);
  std::vector<JournalRecord> out;
  JournalRecord r;
  while (rd.next(r)) out.push_back(r);
  rep = rd.report();
  return out;
}

std::string write_journal(const fs::path& dir, int records, uint64_t segment_bytes) {
  fs::remove_all(dir);
  JournalIdentity id;
  id.population_hash = 0x1234;
  id.config_hash = 0x5678;
  const std::string meta = "meta-bytes";
  JournalWriter w(dir.string(), id, meta.data(), meta.size(), 1, segment_bytes);
  for (int i = 0; i < records; ++i) {
    const std::string p(static_cast<size_t>(100 + i % 300), static_cast<char>('a' + i % 26));
    w.append(RecordType::Bars, p.data(), p.size());
    if (i % 10 == 9) w.commit(true);
  }
  w.close();
  return dir.string();
}

}  // namespace

int main() {
  CHECK_EQ(crc32c(0, "123456789", 9), 0xE3069283u);
  const std::vector<char> zeros(32, 0);
  CHECK_EQ(crc32c(0, zeros.data(), zeros.size()), 0x8A9136AAu);

  const fs::path base = fs::temp_directory_path() / ("dc_test_journal_" + std::to_string(::getpid()));
  // round trip across segments
  const std::string dir = write_journal(base / "a", 2000, 1 << 16);
  ScanReport rep;
  auto recs = read_all(dir, rep);
  CHECK(rep.status == ScanStatus::Ok);
  CHECK_EQ(recs.size(), 2001u);
  CHECK(rep.segments > 3);
  CHECK_EQ(rep.identity.population_hash, 0x1234u);
  CHECK(recs[0].type == static_cast<uint16_t>(RecordType::Meta) && recs[0].payload == "meta-bytes");
  bool ok = true;
  for (size_t i = 1; i < recs.size(); ++i) {
    const int k = static_cast<int>(i) - 1;
    ok = ok && recs[i].seq == i + 1 && recs[i].payload.size() == static_cast<size_t>(100 + k % 300) &&
         recs[i].payload[0] == static_cast<char>('a' + k % 26);
  }
  CHECK(ok);
  bool threw = false;
  try {
    JournalWriter again(dir, JournalIdentity{}, nullptr, 0, 0, 1 << 16);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);

  // torn tail: cut the last record of the last segment in half
  const auto segs = journal_segments(dir);
  const JournalRecord last = recs.back();
  CHECK_EQ(segs.size(), static_cast<size_t>(last.segment) + 1);
  fs::resize_file(segs.back(), last.offset + kJournalRecordHeader + last.payload.size() / 2);
  ScanReport torn = scan_journal(dir, false);
  CHECK(torn.status == ScanStatus::TornTail);
  CHECK_EQ(torn.bad_offset, last.offset);
  CHECK_EQ(torn.records, 2000u);
  ScanReport fixed = scan_journal(dir, true);
  CHECK(fixed.repaired && fixed.truncated_bytes == kJournalRecordHeader + last.payload.size() / 2);
  CHECK(scan_journal(dir, false).status == ScanStatus::Ok);

  // a flipped byte in the middle: corruption at that record's offset, never repaired
  const std::string dir2 = write_journal(base / "b", 50, 1 << 20);
  ScanReport r2;
  auto recs2 = read_all(dir2, r2);
  const JournalRecord victim = recs2[20];
  {
    std::fstream f(journal_segments(dir2)[0], std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(victim.offset + kJournalRecordHeader + 3));
    f.put('#');
  }
  ScanReport bad = scan_journal(dir2, true);
  CHECK(bad.status == ScanStatus::Corrupt && !bad.repaired);
  CHECK_EQ(bad.bad_offset, victim.offset);
  CHECK_EQ(bad.records, 20u);

  // a flipped bit in the length of the last record: its header CRC fails, so it is corruption
  // (format 1 read it as a torn tail, and repair deleted the intact record)
  const std::string dir3 = write_journal(base / "c", 30, 1 << 20);
  ScanReport r3;
  auto recs3 = read_all(dir3, r3);
  {
    std::fstream f(journal_segments(dir3)[0], std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(recs3.back().offset + 2));
    f.put('\x7f');  // length now runs far past the end of the file
  }
  ScanReport flipped = scan_journal(dir3, true);
  CHECK(flipped.status == ScanStatus::Corrupt && !flipped.repaired);
  CHECK_EQ(flipped.bad_offset, recs3.back().offset);

  // a tail of zeros (blocks a crash left unwritten) is torn, and repair removes it
  const std::string dir4 = write_journal(base / "d", 10, 1 << 20);
  const uint64_t size4 = fs::file_size(journal_segments(dir4)[0]);
  {
    std::ofstream f(journal_segments(dir4)[0], std::ios::binary | std::ios::app);
    const std::string z(5000, '\0');
    f.write(z.data(), static_cast<std::streamsize>(z.size()));
  }
  ScanReport ztail = scan_journal(dir4, true);
  CHECK(ztail.status == ScanStatus::TornTail && ztail.repaired);
  CHECK_EQ(ztail.truncated_bytes, uint64_t{5000});
  CHECK_EQ(fs::file_size(journal_segments(dir4)[0]), size4);

  // a failed write (the file size limit stands in for a full disk): JournalFailure, the file cut
  // back to the last complete commit, everything after refused, the journal intact
  {
    const std::string dir5 = (base / "e").string();
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit old{};
    ::getrlimit(RLIMIT_FSIZE, &old);
    JournalWriter w(dir5, JournalIdentity{}, "m", 1, 0, 1 << 20);
    rlimit lim = old;
    lim.rlim_cur = 100000;
    CHECK_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
    const std::string p(3000, 'x');
    int committed = 0;
    bool failed = false;
    for (int i = 0; i < 100 && !failed; ++i) {
      try {
        w.append(RecordType::Bars, p.data(), p.size());
        w.append(RecordType::Bars, p.data(), p.size());
        w.commit(true);
        committed += 2;
      } catch (const JournalFailure&) {
        failed = true;
      }
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    CHECK(failed && w.failed() && committed > 0);
    bool refused = false;
    try {
      w.append(RecordType::Bars, p.data(), p.size());
    } catch (const JournalFailure&) {
      refused = true;
    }
    CHECK(refused);
    w.close();
    ScanReport r5 = scan_journal(dir5, false);
    CHECK(r5.status == ScanStatus::Ok);
    CHECK_EQ(r5.records, static_cast<uint64_t>(committed) + 1);
    CHECK_EQ(fs::file_size(journal_segments(dir5)[0]),
             kJournalFileHeader + (kJournalRecordHeader + 1) + committed * (kJournalRecordHeader + p.size()));
  }

  // a meta record over the limit: refused before anything is made
  {
    bool too_big = false;
    try {
      const std::vector<char> huge(static_cast<size_t>(kJournalMaxMeta) + 1);
      JournalWriter w((base / "f").string(), JournalIdentity{}, huge.data(), huge.size(), 0, 1 << 20);
    } catch (const std::length_error&) {
      too_big = true;
    }
    CHECK(too_big);
    CHECK(journal_segments((base / "f").string()).empty());
  }

  // names of segments that are not regular files: unreadable (not corrupt: nothing is known of
  // their records, and repair leaves them), read without hanging
  {
    const fs::path g = base / "g";
    fs::create_directories(g);
    CHECK_EQ(::mkfifo((g / "seg-000000.dcj").c_str(), 0600), 0);
    ScanReport fifo = scan_journal(g.string(), true);
    CHECK(fifo.status == ScanStatus::Unreadable && !fifo.repaired);
    CHECK(fifo.detail.find("not a regular file") != std::string::npos);
    CHECK(fs::is_fifo(g / "seg-000000.dcj"));
    fs::remove(g / "seg-000000.dcj");
    fs::create_directories(g / "seg-000000.dcj");
    CHECK(scan_journal(g.string(), false).status == ScanStatus::Unreadable);
  }

  // a read error in the last segment is not a torn tail: unreadable, with the error and where,
  // and repair truncates nothing (the data past the error may be fine)
  {
    const std::string h = write_journal(base / "h", 300, 1 << 20);
    const std::vector<std::string> segs = journal_segments(h);
    CHECK_EQ(segs.size(), 1u);
    const auto size = fs::file_size(segs[0]);
    g_eio_from = static_cast<long long>(size / 2);
    ScanReport r1;
    const auto before_error = read_all(h, r1);
    CHECK(r1.status == ScanStatus::Unreadable);
    CHECK(r1.detail.find("cannot read") != std::string::npos);
    CHECK(r1.detail.find(std::strerror(EIO)) != std::string::npos);
    CHECK(!before_error.empty() && before_error.size() < 301u);
    ScanReport r2 = scan_journal(h, true);
    CHECK(r2.status == ScanStatus::Unreadable && !r2.repaired);
    g_eio_from = 0;  // the segment header itself
    CHECK(scan_journal(h, true).status == ScanStatus::Unreadable);
    g_eio_from = -1;
    CHECK_EQ(fs::file_size(segs[0]), size);
    ScanReport r3;
    CHECK_EQ(read_all(h, r3).size(), 301u);
    CHECK(r3.status == ScanStatus::Ok);
  }

  fs::remove_all(base);
  return finish("journal");
}
