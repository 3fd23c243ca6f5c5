// Multi-threaded stress run and wake-up timing for GradientQueue, shared by the
// stress binary (csrc/stress.cpp, also built under ThreadSanitizer) and the Python
// extension (tests and `ringmaster bench queue`). Header-only, no Python.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ringmaster/queue.hpp"

namespace ringmaster {

struct StressConfig {
  std::uint32_t producers = 8;
  std::uint64_t records_per_producer = 1000000;
  std::uint32_t consumers = 1;
  std::uint64_t capacity = 1024;
  std::uint32_t num_slots = 512;
  // > 1: consumers drain with pop_many(batch).
  std::uint64_t batch = 1;
  // > 0: staleness mode. Records carry the model version read just before the push,
  // the (single) consumer bumps the version every `bump_every` records and pops with
  // pop_fresh(max_delay). Otherwise a record's version is its per-producer sequence
  // number, which lets consumers check loss, duplication and order record by record.
  std::uint64_t max_delay = 0;
  std::uint64_t bump_every = 4;
};

struct StressResult {
  std::uint64_t expected = 0;      // producers * records_per_producer
  std::uint64_t received = 0;      // records returned to consumers
  std::uint64_t discarded = 0;     // stale records recycled by pop_fresh
  std::uint64_t lost = 0;          // sequence numbers never received
  std::uint64_t duplicated = 0;    // sequence numbers received twice
  std::uint64_t out_of_order = 0;  // a consumer saw a producer's sequence go backwards
  std::uint64_t stale_returned = 0;  // pop_fresh returned a record with delay >= max_delay
  bool stats_consistent = false;   // queue counters agree with what the threads saw
  double seconds = 0.0;            // from the first push to the last record drained
  std::string error;               // an exception escaped a thread

  bool ok() const {
    return error.empty() && stats_consistent && lost == 0 && duplicated == 0 && out_of_order == 0 &&
           stale_returned == 0 && received + discarded == expected;
  }
  std::string summary() const {
    return "expected=" + std::to_string(expected) + " received=" + std::to_string(received) +
           " discarded=" + std::to_string(discarded) + " lost=" + std::to_string(lost) +
           " duplicated=" + std::to_string(duplicated) + " out_of_order=" + std::to_string(out_of_order) +
           " stale_returned=" + std::to_string(stale_returned) +
           " stats_consistent=" + (stats_consistent ? "1" : "0") + (error.empty() ? "" : " error=" + error);
  }
};

inline StressResult run_stress(const StressConfig& cfg) {
  if (cfg.producers == 0) throw InvalidArgument("producers", "must be >= 1");
  if (cfg.consumers == 0) throw InvalidArgument("consumers", "must be >= 1");
  if (cfg.batch == 0) throw InvalidArgument("batch", "must be >= 1");
  if (cfg.max_delay > 0 && cfg.consumers != 1) {
    throw InvalidArgument("consumers", "staleness mode (max_delay > 0) needs exactly one consumer");
  }
  if (cfg.max_delay > 0 && cfg.bump_every == 0) throw InvalidArgument("bump_every", "must be >= 1");
  // One byte of bookkeeping per record.
  if (cfg.records_per_producer > (std::uint64_t{1} << 30) / cfg.producers) {
    throw InvalidArgument("records_per_producer", "producers * records_per_producer must be <= 2**30");
  }
  GradientQueue queue(cfg.capacity, cfg.num_slots, cfg.producers);
  const std::uint64_t n = cfg.records_per_producer;
  const bool staleness = cfg.max_delay > 0;

  // seen[w * n + i]: times record i of producer w arrived (sequence mode only).
  std::vector<std::atomic<std::uint8_t>> seen(staleness ? 0 : std::size_t(cfg.producers) * n);
  for (auto& s : seen) s.store(0, std::memory_order_relaxed);
  std::atomic<std::uint64_t> received{0}, out_of_order{0}, stale_returned{0};
  std::mutex error_mutex;
  std::string error;
  auto guarded = [&](auto body) {
    return [&, body] {
      try {
        body();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = e.what();
        queue.close();  // unblock everyone else
      }
    };
  };

  auto consume = [&] {
    std::vector<std::uint64_t> last(cfg.producers, ~std::uint64_t{0});  // ~0: nothing yet
    std::vector<Record> batch(cfg.batch);
    std::uint64_t mine = 0;
    auto accept = [&](const Record& r) {
      ++mine;
      if (staleness) {
        if (queue.delay_of(r) >= cfg.max_delay) stale_returned.fetch_add(1, std::memory_order_relaxed);
        if (mine % cfg.bump_every == 0) queue.bump_version();
      } else {
        const std::uint64_t seq = r.version;
        if (last[r.worker] != ~std::uint64_t{0} && seq <= last[r.worker]) {
          out_of_order.fetch_add(1, std::memory_order_relaxed);
        }
        last[r.worker] = seq;
        if (seq < n) seen[std::size_t(r.worker) * n + seq].fetch_add(1, std::memory_order_relaxed);
      }
      queue.release_slot(r.slot);
    };
    try {
      for (;;) {
        if (staleness) {
          accept(*queue.pop_fresh(cfg.max_delay, Deadline::never()));
        } else if (cfg.batch > 1) {
          const std::size_t got = queue.pop_many(batch.data(), batch.size(), Deadline::never());
          for (std::size_t i = 0; i < got; ++i) accept(batch[i]);
        } else {
          accept(*queue.pop(Deadline::never()));
        }
      }
    } catch (const QueueClosed&) {
      // Closed and drained: this consumer is done.
    }
    received.fetch_add(mine, std::memory_order_relaxed);
  };

  auto produce = [&](std::uint32_t worker) {
    for (std::uint64_t i = 0; i < n; ++i) {
      const std::uint32_t slot = *queue.acquire_slot(Deadline::never());
      const std::uint64_t version = staleness ? queue.version() : i;
      queue.push(Record{slot, worker, version}, Deadline::never());
    }
  };

  const auto start = Clock::now();
  std::vector<std::thread> consumers, producers;
  for (std::uint32_t c = 0; c < cfg.consumers; ++c) consumers.emplace_back(guarded(consume));
  for (std::uint32_t w = 0; w < cfg.producers; ++w) {
    producers.emplace_back(guarded([&, w] { produce(w); }));
  }
  for (auto& t : producers) t.join();
  queue.close();
  for (auto& t : consumers) t.join();

  StressResult result;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  result.expected = std::uint64_t(cfg.producers) * n;
  result.received = received.load();
  result.out_of_order = out_of_order.load();
  result.stale_returned = stale_returned.load();
  result.error = error;
  for (const auto& s : seen) {
    const std::uint8_t times = s.load(std::memory_order_relaxed);
    if (times == 0) ++result.lost;
    if (times > 1) result.duplicated += times - 1;
  }
  const QueueStats stats = queue.stats();
  result.discarded = stats.discarded;
  bool consistent = stats.pushed == result.expected && stats.popped == result.received &&
                    queue.size() == 0 && queue.free_slots() == cfg.num_slots;
  for (const WorkerStats& w : stats.per_worker) {
    consistent = consistent && w.pushed == n && w.popped + w.discarded == n;
  }
  result.stats_consistent = consistent;
  return result;
}

// Push-to-wake latency: a consumer sleeps in pop(); after `idle_s` (long enough to
// be past the spin phase) a producer stamps the time into the record and pushes it.
// Returns one latency per sample, in microseconds.
inline std::vector<double> wakeup_latencies_us(std::uint32_t samples, double idle_s) {
  if (samples == 0) throw InvalidArgument("samples", "must be >= 1");
  if (!(idle_s >= 0.0)) throw InvalidArgument("idle_s", "must be >= 0");
  GradientQueue queue(2, 1, 1);
  std::vector<double> latencies;
  latencies.reserve(samples);
  auto ns_now = [] {
    return std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                             Clock::now().time_since_epoch()).count());
  };
  std::thread consumer([&] {
    try {
      for (;;) {
        const Record r = *queue.pop(Deadline::never());
        latencies.push_back(double(ns_now() - r.version) / 1e3);
        queue.release_slot(r.slot);
      }
    } catch (const QueueClosed&) {
    }
  });
  for (std::uint32_t i = 0; i < samples; ++i) {
    const std::uint32_t slot = *queue.acquire_slot(Deadline::never());
    std::this_thread::sleep_for(std::chrono::duration<double>(idle_s));
    queue.push(Record{slot, 0, ns_now()}, Deadline::never());
  }
  // The slot comes back only after the consumer recorded the last sample.
  queue.release_slot(*queue.acquire_slot(Deadline::never()));
  queue.close();
  consumer.join();
  return latencies;
}

}  // namespace ringmaster
