// The journal: writer statistics, the reader, verification and repair, and the engine's hooks.
#include <pybind11/stl.h>

#include "../dynamic_core/engine.hpp"
#include "../dynamic_core/journal.hpp"
#include "common.hpp"

namespace dynamic_core::bindings {

namespace {

JournalIdentity identity(uint64_t population_hash, uint64_t config_hash, const std::string& build_id) {
  JournalIdentity id;
  id.population_hash = population_hash;
  id.config_hash = config_hash;
  std::memcpy(id.build_id, build_id.data(), std::min(build_id.size(), sizeof id.build_id));
  return id;
}

const char* status_name(ScanStatus s) {
  switch (s) {
    case ScanStatus::Ok: return "ok";
    case ScanStatus::TornTail: return "torn_tail";
    case ScanStatus::Corrupt: return "corrupt";
    case ScanStatus::Empty: return "empty";
    case ScanStatus::Unsupported: return "unsupported";
    case ScanStatus::Unreadable: return "unreadable";
  }
  return "unknown";
}

py::dict report_dict(const ScanReport& r) {
  py::dict d;
  d["status"] = status_name(r.status);
  d["records"] = r.records;
  d["last_seq"] = r.last_seq;
  d["segments"] = r.segments;
  d["bad_segment"] = r.bad_segment;
  d["bad_offset"] = r.bad_offset;
  d["truncated_bytes"] = r.truncated_bytes;
  d["repaired"] = r.repaired;
  d["detail"] = r.detail;
  d["format"] = r.format;
  d["population_hash"] = r.identity.population_hash;
  d["config_hash"] = r.identity.config_hash;
  d["build_id"] = std::string(r.identity.build_id, strnlen(r.identity.build_id, sizeof r.identity.build_id));
  return d;
}

py::dict stats_dict(const JournalStats& s) {
  py::dict d;
  d["records"] = s.records;
  d["bytes"] = s.bytes;
  d["commits"] = s.commits;
  d["syncs"] = s.syncs;
  d["segments"] = s.segments;
  d["error"] = s.error;
  return d;
}

}  // namespace

void bind_journal(py::module_& m) {
  py::enum_<RecordType>(m, "RecordType", "Journal record types.")
      .value("META", RecordType::Meta)
      .value("BARS", RecordType::Bars)
      .value("DEAD_LETTER", RecordType::DeadLetter)
      .value("CONTROL", RecordType::Control)
      .value("SIGNAL_HASHES", RecordType::SignalHashes)
      .value("INSTRUMENTS", RecordType::Instruments)
      .value("EVENT", RecordType::Event);

  m.attr("JOURNAL_FORMAT") = kJournalFormat;
  m.attr("JOURNAL_RECORD_HEADER") = kJournalRecordHeader;
  m.attr("JOURNAL_MAX_RECORD") = kJournalMaxRecord;
  m.attr("JOURNAL_MAX_META") = kJournalMaxMeta;
  m.attr("RECORD_MORE") = kRecordMore;
  m.def("crc32c", [](py::bytes data, uint32_t crc) {
        const std::string_view v = data;
        return crc32c(crc, v.data(), v.size());
      }, py::arg("data"), py::arg("crc") = 0, "CRC32C (Castagnoli) of `data`, continuing from `crc`.");
  m.def("signal_hashes", [](const py::array& signals) {
        const Signal* s = records_of<Signal>(signals, "signal");
        const auto n = static_cast<py::ssize_t>(signals.shape(0));
        py::array_t<uint64_t> out(n);
        uint64_t* o = out.mutable_data();
        for (py::ssize_t i = 0; i < n; ++i) o[i] = fnv1a64(&s[i], sizeof(Signal));
        return out;
      }, py::arg("signals"), "FNV-1a 64 of each signal record: the hash the journal keeps.");
  m.def("journal_scan", [](const std::string& dir, bool repair, py::object progress) {
        std::function<void(uint64_t, uint64_t)> call;
        if (!progress.is_none())
          call = [&progress](uint64_t done, uint64_t total) {
            py::gil_scoped_acquire gil;
            progress(done, total);  // an exception (^C) ends the scan, before any repair
          };
        ScanReport r;
        without_gil([&] {
          r = scan_journal(dir, repair, call);
        });
        return report_dict(r);
      }, py::arg("dir"), py::arg("repair") = false, py::arg("progress") = py::none(),
      "Walk a journal checking framing and CRCs; with repair, truncate a torn tail. `progress(done, "
      "total)` (bytes) is called every journal_progress_step(total) bytes and at the end.");

  m.def("journal_locked", &journal_locked, py::arg("dir"),
        "True while a writer (in any process) holds the journal directory open (its flock).");

  py::class_<JournalReader>(m, "JournalReader", "Reads journal records in order.")
      .def(py::init<const std::string&>(), py::arg("dir"))
      .def("next", [](JournalReader& r) -> py::object {
             JournalRecord rec;
             bool ok;
             without_gil([&] {
               ok = r.next(rec);
             });
             if (!ok) return py::none();
             return py::make_tuple(rec.type, rec.seq, py::bytes(rec.payload), rec.segment, rec.offset, rec.flags);
           }, "Next record as (type, seq, payload, segment, offset, flags), or None at the end or at a bad record.")
      .def("report", [](const JournalReader& r) { return report_dict(r.report()); },
           "Where reading stopped and why (status ok, torn_tail, corrupt, unreadable, unsupported or empty).")
      .def("bytes_done", &JournalReader::bytes_done,
           "Bytes read so far: the segments before the current one and the records of this one.")
      .def("bytes_total", &JournalReader::bytes_total, "The segments' total size when the reader was made.");
  m.def("journal_progress_step", &journal_progress_step, py::arg("total"),
        "Bytes between progress calls over a journal of `total` bytes: every 1%, at most 8 MB apart.");

}

void bind_engine_journal(py::class_<Engine>& e) {
  e.def("open_journal", [](Engine& en, const std::string& dir, py::bytes meta, uint64_t population_hash,
                           uint64_t config_hash, const std::string& build_id, int fsync_level,
                           uint64_t segment_bytes) {
         const std::string_view v = meta;
         const std::string copy(v);
         without_gil([&] {
           en.open_journal(dir, identity(population_hash, config_hash, build_id), copy.data(), copy.size(),
                           fsync_level, segment_bytes);
         });
       }, py::arg("dir"), py::arg("meta"), py::arg("population_hash"), py::arg("config_hash"),
       py::arg("build_id"), py::arg("fsync_level"), py::arg("segment_bytes"))
      .def("journal_append", [](Engine& en, RecordType type, py::bytes data, bool durable) {
             const std::string copy(static_cast<std::string_view>(data));
             return without_gil([&] { return en.journal_append(type, copy.data(), copy.size(), durable); });
           }, py::arg("type"), py::arg("data"), py::arg("durable") = true)
      .def("journal_stats", [](Engine& en) {
             JournalStats st;
             without_gil([&] { // its lock is held across a durable commit (an fsync)
               st = en.journal_stats();
             });
             return stats_dict(st);
           })
      .def("has_journal", &Engine::has_journal)
      .def("forget_journal_after_fork", &Engine::forget_journal_after_fork,
           "In a child made by fork(): close this process's copies of the journal's files, writing nothing.")
      .def("close_journal", [](Engine& en) {
             without_gil([&] { en.close_journal(); });
           });
}

}  // namespace dynamic_core::bindings
