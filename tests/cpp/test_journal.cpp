// The journal writer and reader alone: framing, CRC32C, segment rollover, torn tail and repair,
// corruption with its offset.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "check.hpp"
#include "dynamic_core/journal.hpp"

using namespace dynamic_core;
namespace fs = std::filesystem;

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

  fs::remove_all(base);
  return finish("journal");
}
