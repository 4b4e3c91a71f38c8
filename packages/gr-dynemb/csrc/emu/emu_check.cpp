// The emulated CUDA table (run.sh) against the CPU table: every check must hold exactly (same statuses, rows, scores).
#include <numeric>
#include <algorithm>
#include <cassert>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>
#include "table/cpu_table.h"
#include "table/cuda_table.h"
using namespace gr_dynemb;
static int failures = 0;
#define CHECK(c) do { if (!(c)) { ++failures; std::printf("FAIL %s:%d %s\n", __FILE__, __LINE__, #c); } } while (0)

struct Row { std::vector<float> v; uint64_t s; bool operator==(const Row& o) const { return v == o.v && s == o.s; } };
template <class T> std::map<int64_t, Row> contents_cpu(T& t, int vd) {
  int64_t n = t.count_if_score_at_least(0);
  std::vector<int64_t> k(n); std::vector<float> v(n * vd); std::vector<uint64_t> s(n);
  int64_t got = t.export_if_score_at_least(0, k.data(), v.data(), s.data(), n);
  std::map<int64_t, Row> m; for (int64_t i = 0; i < got; ++i) m[k[i]] = Row{{v.begin() + i * vd, v.begin() + (i + 1) * vd}, s[i]};
  CHECK(got == n); return m;
}
std::map<int64_t, Row> contents_gpu(CudaTable& t, int vd) {
  int64_t n = t.count_if_score_at_least(0, 0);
  std::vector<int64_t> k(n); std::vector<float> v(n * vd); std::vector<uint64_t> s(n);
  int64_t got = t.export_if_score_at_least(0, k.data(), v.data(), s.data(), n, 0);
  std::map<int64_t, Row> m; for (int64_t i = 0; i < got; ++i) m[k[i]] = Row{{v.begin() + i * vd, v.begin() + (i + 1) * vd}, s[i]};
  CHECK(got == n);
  // slot order: keys must come out in increasing slot order -> just check no duplicates
  CHECK((int64_t)m.size() == got); return m;
}
TableOptions topt(int dim, int vd, int64_t cap, int64_t maxcap, ScorePolicy p, double lf, Initializer in = {}) {
  TableOptions o; o.capacity = cap; o.max_capacity = maxcap; o.dim = dim; o.value_dim = vd; o.policy = p; o.init = in; o.max_load_factor = lf; o.num_threads = 1; return o;
}
CudaTableOptions gopt(const TableOptions& t, int64_t budget = -1) {
  CudaTableOptions o; o.capacity = t.capacity; o.max_capacity = t.max_capacity; o.dim = t.dim; o.value_dim = t.value_dim; o.policy = t.policy; o.init = t.init; o.max_load_factor = t.max_load_factor; o.hbm_budget_bytes = budget; return o;
}
bool near(const std::vector<float>& a, const std::vector<float>& b) { if (a.size() != b.size()) return false; for (size_t i = 0; i < a.size(); ++i) if (std::fabs(a[i] - b[i]) > 1e-5f * (1 + std::fabs(b[i]))) return false; return true; }

void twin(ScorePolicy pol, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int dim = 3, vd = 5;
  auto to = topt(dim, vd, 128, 1 << 14, pol, 0.6, Initializer{InitKind::kTruncatedNormal, 0.f, 0.5f, 7});
  CpuTable cpu(to); CudaTable gpu(gopt(to));
  std::vector<int64_t> pool; for (int i = 0; i < 400; ++i) pool.push_back(int64_t(rng()) | 1);
  pool.push_back(INT64_MAX); pool.push_back(0);
  for (int step = 1; step <= 6; ++step) {
    cpu.set_step(step); gpu.set_step(step); cpu.set_epoch(step / 3); gpu.set_epoch(step / 3);
    std::shuffle(pool.begin(), pool.end(), rng);
    int n = 1 + rng() % 150; std::vector<int64_t> keys(pool.begin(), pool.begin() + n);
    std::vector<float> a(n * vd), b(n * vd); std::vector<int8_t> sa(n), sb(n);
    cpu.find_or_insert(keys.data(), n, a.data(), sa.data(), nullptr); gpu.find_or_insert(keys.data(), n, b.data(), sb.data(), nullptr, 0);
    CHECK(a == b); CHECK(sa == sb);
    std::vector<float> rows(n * vd); for (auto& x : rows) x = float(rng() % 1000) / 100.f;
    cpu.insert_or_assign(keys.data(), n, rows.data(), sa.data(), nullptr); gpu.insert_or_assign(keys.data(), n, rows.data(), sb.data(), nullptr, 0);
    CHECK(sa == sb);
    int h = n / 2; std::vector<char> fa(n), fb(n);
    cpu.assign(keys.data(), h, rows.data(), (bool*)fa.data()); gpu.assign(keys.data(), h, rows.data(), (bool*)fb.data(), 0); CHECK(fa == fb);
    cpu.accumulate(keys.data(), h, rows.data(), (bool*)fa.data()); gpu.accumulate(keys.data(), h, rows.data(), (bool*)fb.data(), 0); CHECK(fa == fb);
    std::shuffle(pool.begin(), pool.end(), rng);
    std::vector<int64_t> probe(pool.begin(), pool.begin() + 64);
    std::vector<float> pa(64 * vd), pb(64 * vd); std::vector<char> ga(64), gb(64);
    cpu.find(probe.data(), 64, pa.data(), (bool*)ga.data(), true); gpu.find(probe.data(), 64, pb.data(), (bool*)gb.data(), true, 0);
    CHECK(pa == pb); CHECK(ga == gb);
    std::vector<int64_t> gone(pool.begin() + 100, pool.begin() + 120);
    CHECK(cpu.erase(gone.data(), 20) == gpu.erase(gone.data(), 20, 0));
    CHECK(cpu.size() == gpu.size(0)); CHECK(cpu.capacity() == gpu.capacity());
    auto ca = contents_cpu(cpu, vd); auto cb = contents_gpu(gpu, vd); CHECK(ca == cb);
  }
  CHECK(cpu.erase_if_score_below(3) == gpu.erase_if_score_below(3, 0));
  CHECK(contents_cpu(cpu, vd) == contents_gpu(gpu, vd));
  gpu.clear(0); CHECK(gpu.size(0) == 0 && contents_gpu(gpu, vd).empty());
}

void dups() {
  auto to = topt(4, 4, 1 << 10, 1 << 16, ScorePolicy::kLfu, 0.75);
  CudaTable gpu(gopt(to)); CpuTable cpu(to);
  std::mt19937_64 rng(3); std::vector<int64_t> distinct(50); for (auto& k : distinct) k = int64_t(rng() >> 2);
  std::vector<int64_t> keys(600); for (auto& k : keys) k = distinct[rng() % 50];
  std::vector<float> v(600 * 4), init(600 * 4); std::vector<int8_t> st(600);
  gpu.find_or_insert(keys.data(), 600, v.data(), st.data(), nullptr, 0);
  std::set<int64_t> uniq(keys.begin(), keys.end()); int ins = 0; std::set<int64_t> insk;
  for (int i = 0; i < 600; ++i) { if (st[i] == 1) { ++ins; insk.insert(keys[i]); } CHECK(st[i] == 0 || st[i] == 1); }
  CHECK(ins == (int)uniq.size() && insk == uniq); CHECK(gpu.size(0) == (int64_t)uniq.size());
  gpu.initial_rows(keys.data(), 600, init.data(), 0); CHECK(v == init);
  for (int i = 0; i < 600; ++i) { std::vector<float> r(4); cpu.initial_row(keys[i], r.data()); CHECK(std::vector<float>(init.begin() + 4 * i, init.begin() + 4 * i + 4) == r); }
  std::vector<float> ones(600 * 4, 1.f); std::vector<char> f(600);
  gpu.accumulate(keys.data(), 600, ones.data(), (bool*)f.data(), 0);
  std::map<int64_t, int> cnt; for (auto k : keys) cnt[k]++;
  std::vector<int64_t> u(uniq.begin(), uniq.end()); std::vector<float> got(u.size() * 4); std::vector<char> fu(u.size());
  gpu.find(u.data(), u.size(), got.data(), (bool*)fu.data(), false, 0);
  for (size_t i = 0; i < u.size(); ++i) { std::vector<float> r(4); cpu.initial_row(u[i], r.data()); for (int c = 0; c < 4; ++c) CHECK(std::fabs(got[i * 4 + c] - (r[c] + cnt[u[i]])) < 1e-4); }
  // LFU scores: each duplicate touched once: score = count
  auto cg = contents_gpu(gpu, 4); for (auto& [k, row] : cg) CHECK(row.s == (uint64_t)cnt[k]);
  CHECK(gpu.erase(keys.data(), 600, 0) == (int64_t)uniq.size()); CHECK(gpu.size(0) == 0);
}

void eviction(ScorePolicy pol) {
  auto to = topt(2, 2, 128, 128, pol, 1.0);
  CpuTable cpu(to); CudaTable gpu(gopt(to));
  std::mt19937_64 rng(11);
  std::vector<int64_t> keys(208); for (auto& k : keys) k = int64_t(rng() >> 1) + 5;
  for (int i = 0; i < 208; ++i) {
    cpu.set_step(1 + i / 16); gpu.set_step(1 + i / 16); cpu.set_epoch(i / 64); gpu.set_epoch(i / 64);
    if (i % 2 && i > 10) { int64_t o = keys[i / 3]; std::vector<float> x(2), y(2); bool a, b; cpu.find(&o, 1, x.data(), &a, true); gpu.find(&o, 1, y.data(), &b, true, 0); CHECK(a == b); }
    uint64_t sc = rng() % 50; const uint64_t* sp = pol == ScorePolicy::kCustom ? &sc : nullptr;
    std::vector<float> x(2), y(2); int8_t a, b;
    cpu.find_or_insert(&keys[i], 1, x.data(), &a, sp); gpu.find_or_insert(&keys[i], 1, y.data(), &b, sp, 0);
    CHECK(a == b); if (a != b) std::printf("  policy %d key %d: cpu %d gpu %d\n", int(pol), i, a, b);
  }
  CHECK(contents_cpu(cpu, 2) == contents_gpu(gpu, 2));
  CHECK(cpu.evicted_count() == gpu.evicted_count(0)); CHECK(cpu.rejected_count() == gpu.rejected_count(0));
  std::printf("  policy %d: evicted %ld rejected %ld\n", int(pol), (long)gpu.evicted_count(0), (long)gpu.rejected_count(0));
}

void full_batch() {
  auto to = topt(2, 2, 128, 128, ScorePolicy::kCustom, 1.0);
  CpuTable cpu(to); CudaTable gpu(gopt(to));
  std::vector<int64_t> old(128), nw(64); std::vector<uint64_t> so(128), sn(64);
  for (int i = 0; i < 128; ++i) { old[i] = i + 1; so[i] = (i + 1) * 10; }
  for (int i = 0; i < 64; ++i) { nw[i] = 1000 + i; sn[i] = (i + 1) * 10 - 5; }
  std::vector<float> z(128 * 2, 0.f), o(64 * 2, 1.f); std::vector<int8_t> st(128), st2(64), st3(64);
  cpu.insert_or_assign(old.data(), 128, z.data(), st.data(), so.data()); gpu.insert_or_assign(old.data(), 128, z.data(), st.data(), so.data(), 0);
  cpu.insert_or_assign(nw.data(), 64, o.data(), st2.data(), sn.data()); gpu.insert_or_assign(nw.data(), 64, o.data(), st3.data(), sn.data(), 0);
  auto a = contents_cpu(cpu, 2), b = contents_gpu(gpu, 2); CHECK(a == b);
  for (auto& [k, r] : b) CHECK(r.s > 320);
  CHECK(gpu.size(0) == 128);
}

void hybrid() {
  auto to = topt(16, 32, 1024, 1 << 14, ScorePolicy::kLru, 0.75, Initializer{InitKind::kNormal, 0.1f, 2.f, 3});
  for (int64_t budget_rows : {0, 384}) {
    CudaTable hbm(gopt(to)); CudaTable hyb(gopt(to, budget_rows * 32 * 4)); CpuTable cpu(to);
    CHECK(hyb.hbm_slots() == budget_rows);
    std::mt19937_64 rng(5);
    for (int step = 1; step <= 4; ++step) {
      hbm.set_step(step); hyb.set_step(step); cpu.set_step(step);
      std::vector<int64_t> keys(700); for (auto& k : keys) k = int64_t(rng() >> 1);
      std::vector<float> a(700 * 32), b(700 * 32), c(700 * 32); std::vector<int8_t> sa(700), sb(700), sc(700);
      hbm.find_or_insert(keys.data(), 700, a.data(), sa.data(), nullptr, 0); hyb.find_or_insert(keys.data(), 700, b.data(), sb.data(), nullptr, 0);
      cpu.find_or_insert(keys.data(), 700, c.data(), sc.data(), nullptr);
      CHECK(a == b); CHECK(sa == sb); CHECK(a == c);
      std::vector<float> d(700 * 32); for (auto& x : d) x = float(rng() % 100) / 7.f; std::vector<char> f(700);
      hbm.accumulate(keys.data(), 700, d.data(), (bool*)f.data(), 0); hyb.accumulate(keys.data(), 700, d.data(), (bool*)f.data(), 0);
      cpu.accumulate(keys.data(), 700, d.data(), (bool*)f.data());
    }
    CHECK(hyb.capacity() > 1024 && hyb.hbm_slots() == budget_rows);
    auto x = contents_gpu(hbm, 32), y = contents_gpu(hyb, 32), z = contents_cpu(cpu, 32);
    CHECK(x == y); CHECK(x == z);
    // The two-half find (locate, sort the slots, gather_rows) returns find's rows, zero rows for absent keys.
    std::vector<int64_t> probe; for (auto& [k, r] : x) if (probe.size() < 200) probe.push_back(k);
    for (int i = 0; i < 100; ++i) probe.push_back(int64_t(rng() >> 1));
    std::shuffle(probe.begin(), probe.end(), rng);
    const int64_t n = int64_t(probe.size());
    std::vector<float> want(n * 32), got(n * 32, 7.f); std::vector<char> fw(n), fg(n); std::vector<int64_t> slots(n), order(n), sorted(n);
    hbm.find(probe.data(), n, want.data(), (bool*)fw.data(), false, 0);
    hyb.locate(probe.data(), n, slots.data(), (bool*)fg.data(), false, 0);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
    for (int64_t j = 0; j < n; ++j) sorted[j] = slots[order[j]];
    hyb.gather_rows(sorted.data(), order.data(), n, got.data(), 0);
    CHECK(want == got); CHECK(fw == fg); CHECK(std::count(fg.begin(), fg.end(), 1) == 200);
  }
}

void inits() {
  for (InitKind k : {InitKind::kNormal, InitKind::kTruncatedNormal, InitKind::kUniform, InitKind::kConstant}) {
    for (int dim : {1, 7, 64}) {
      auto to = topt(dim, dim + 3, 128, 128, ScorePolicy::kLru, 0.75, Initializer{k, -0.2f, 0.7f, 11});
      CpuTable cpu(to); CudaTable gpu(gopt(to));
      std::mt19937_64 rng(9); std::vector<int64_t> keys(100); for (auto& x : keys) x = int64_t(rng());
      std::vector<float> g(100 * (dim + 3)), c(dim + 3);
      gpu.initial_rows(keys.data(), 100, g.data(), 0);
      for (int i = 0; i < 100; ++i) { cpu.initial_row(keys[i], c.data()); CHECK(std::vector<float>(g.begin() + i * (dim + 3), g.begin() + (i + 1) * (dim + 3)) == c); }
    }
  }
}

// Fused optimizer steps: distinct present keys, absent keys and a reserved key; rows and states equal exactly, with
// and without bucket locks (distinct), on column-by-column rows (dim 5) and 16-byte-chunk rows (dim 8, value_dim 24).
void optimizers() {
  std::mt19937_64 rng(11);
  for (auto [dim, vd] : {std::pair{5, 15}, std::pair{8, 24}}) {
    for (int kind = 0; kind < 4; ++kind) {
      auto to = topt(dim, vd, 256, 1 << 12, ScorePolicy::kLru, 0.75);
      CpuTable cpu(to); CudaTable gpu(gopt(to)), gpu_distinct(gopt(to));
      std::vector<int64_t> keys; for (int i = 0; i < 90; ++i) keys.push_back(int64_t(rng()) | 1);
      std::vector<float> rows(keys.size() * vd); for (auto& x : rows) x = float(rng() % 2000) / 1000.f;
      std::vector<int8_t> st(keys.size());
      cpu.insert_or_assign(keys.data(), 60, rows.data(), st.data(), nullptr);
      gpu.insert_or_assign(keys.data(), 60, rows.data(), st.data(), nullptr, 0);
      gpu_distinct.insert_or_assign(keys.data(), 60, rows.data(), st.data(), nullptr, 0);
      keys[70] = kEmptyKey;  // keys 60.. are absent, one is reserved
      for (int step = 1; step <= 3; ++step) {
        const OptimizerStep o = OptimizerStep::make(kind, 0.05, 1e-8, 0.9, 0.999, step);
        std::vector<float> g(keys.size() * dim); for (auto& x : g) x = float(int(rng() % 2001) - 1000) / 500.f;
        std::vector<char> fa(keys.size()), fb(keys.size()), fc(keys.size());
        cpu.apply_optimizer(keys.data(), int64_t(keys.size()), g.data(), o, (bool*)fa.data(), step == 2);
        gpu.apply_optimizer(keys.data(), int64_t(keys.size()), g.data(), o, (bool*)fb.data(), false, 0);
        gpu_distinct.apply_optimizer(keys.data(), int64_t(keys.size()), g.data(), o, (bool*)fc.data(), true, 0);
        CHECK(fa == fb); CHECK(fa == fc); CHECK(fa[0] && !fa[60] && !fa[70]);
      }
      CHECK(contents_cpu(cpu, vd) == contents_gpu(gpu, vd));
      CHECK(contents_cpu(cpu, vd) == contents_gpu(gpu_distinct, vd));
    }
  }
}

// find_or_insert_embeddings: the first dim columns of what find_or_insert returns, with the same statuses and table
// contents; batches with duplicates and a reserved key. With growth (LRU) both tables agree exactly; in a full table
// that never evicts, which keys get the last slots depends on the order of concurrent inserts, so the CUDA table's
// output is checked against its own statuses and contents (and the initializer's row for rejected keys).
void embeddings_only() {
  const int dim = 5, vd = 15;
  for (ScorePolicy pol : {ScorePolicy::kLru, ScorePolicy::kNone}) {
    const bool full = pol == ScorePolicy::kNone;
    auto to = topt(dim, vd, 128, full ? 128 : 1 << 12, pol, 1.0, Initializer{InitKind::kUniform, -1.f, 1.f, 4});
    CpuTable cpu_full(to), cpu(to); CudaTable gpu_full(gopt(to)), gpu(gopt(to));
    std::mt19937_64 rng(21);
    for (int step = 1; step <= 3; ++step) {
      cpu_full.set_step(step); cpu.set_step(step); gpu_full.set_step(step); gpu.set_step(step);
      const int n = 90; std::vector<int64_t> keys(n); for (auto& k : keys) k = int64_t(rng() >> 3) + 2;
      keys[7] = kErasedKey; keys[8] = keys[9];
      std::vector<float> full_c(n * vd), full_g(n * vd), emb_c(n * dim), emb_g(n * dim);
      std::vector<int8_t> s1(n), s2(n), s3(n), s4(n);
      cpu_full.find_or_insert(keys.data(), n, full_c.data(), s1.data(), nullptr);
      cpu.find_or_insert_embeddings(keys.data(), n, emb_c.data(), s2.data(), nullptr);
      gpu_full.find_or_insert(keys.data(), n, full_g.data(), s3.data(), nullptr, 0);
      gpu.find_or_insert_embeddings(keys.data(), n, emb_g.data(), s4.data(), nullptr, 0);
      CHECK(s1 == s2);
      for (int i = 0; i < n; ++i) CHECK(std::equal(emb_c.begin() + i * dim, emb_c.begin() + (i + 1) * dim, full_c.begin() + i * vd));
      CHECK(cpu.take_reserved_count() == 1 && gpu.take_reserved_count(0) == 1);
      CHECK(contents_cpu(cpu, vd) == contents_cpu(cpu_full, vd));
      if (!full) {
        // Which copy of the duplicate (8, 9) reports INSERTED is unspecified on the CUDA table.
        auto same = [&](const std::vector<int8_t>& a, const std::vector<int8_t>& b) {
          std::vector<int8_t> x = a, y = b;
          x[8] = x[9] = std::min(x[8], x[9]); y[8] = y[9] = std::min(y[8], y[9]);
          return x == y && a[8] + a[9] == b[8] + b[9];
        };
        CHECK(same(s1, s3)); CHECK(same(s1, s4)); CHECK(full_c == full_g); CHECK(emb_c == emb_g);
        CHECK(contents_cpu(cpu, vd) == contents_gpu(gpu, vd));
        continue;
      }
      auto held = contents_gpu(gpu, vd);
      std::vector<float> init(vd);
      for (int i = 0; i < n; ++i) {
        const float* got = emb_g.data() + i * dim;
        if (s4[i] == int8_t(InsertStatus::kRejected)) {
          cpu.initial_row(keys[i], init.data());
          CHECK(std::equal(got, got + dim, init.begin()) && !held.count(keys[i]));
        } else {
          CHECK(held.count(keys[i]) && std::equal(got, got + dim, held[keys[i]].v.begin()));
        }
      }
    }
    if (full) CHECK(gpu.rejected_count(0) > 0 && gpu.size(0) == 128 && cpu.rejected_count() > 0);
  }
}

// Grouped calls (one launch for several tables) against one call per table: three tables of one dim with
// different optimizers (value dims), an empty one in the middle, growth, keys shared across tables; the CUDA group
// and the CPU group must match the CPU tables driven one by one exactly (statuses, embeddings, found, contents).
void groups() {
  const int dim = 4;
  const int kinds[3] = {0, 3, 1};  // sgd, adam, adagrad
  const int vds[3] = {4, 12, 8};
  std::vector<std::unique_ptr<CpuTable>> single, cgroup;
  std::vector<std::unique_ptr<CudaTable>> ggroup;
  for (int k = 0; k < 3; ++k) {
    auto to = topt(dim, vds[k], 128, 1 << 12, k == 1 ? ScorePolicy::kLfu : ScorePolicy::kLru, 0.75,
                   Initializer{InitKind::kNormal, 0.f, 1.f, uint64_t(k)});
    single.push_back(std::make_unique<CpuTable>(to)); cgroup.push_back(std::make_unique<CpuTable>(to));
    ggroup.push_back(std::make_unique<CudaTable>(gopt(to)));
  }
  std::vector<CpuTable*> cg{cgroup[0].get(), cgroup[1].get(), cgroup[2].get()};
  std::vector<CudaTable*> gg{ggroup[0].get(), ggroup[1].get(), ggroup[2].get()};
  std::mt19937_64 rng(31);
  std::vector<int64_t> pool(300); for (auto& x : pool) x = int64_t(rng() >> 2);
  for (int step = 1; step <= 3; ++step) {
    const std::vector<int64_t> sizes = {int64_t(40 + 30 * step), step == 2 ? 0 : 25, 60};
    std::vector<int64_t> bounds{0}; for (auto n : sizes) bounds.push_back(bounds.back() + n);
    const int64_t total = bounds.back();
    std::vector<int64_t> keys;
    for (int k = 0; k < 3; ++k) { std::shuffle(pool.begin(), pool.end(), rng); keys.insert(keys.end(), pool.begin(), pool.begin() + sizes[k]); }
    for (int k = 0; k < 3; ++k) { single[k]->set_step(step); cgroup[k]->set_step(step); ggroup[k]->set_step(step); }
    std::vector<float> es(total * dim), ec(total * dim), eg(total * dim);
    std::vector<int8_t> ss(total), sc(total), sg(total);
    for (int k = 0; k < 3; ++k)
      single[k]->find_or_insert_embeddings(keys.data() + bounds[k], sizes[k], es.data() + bounds[k] * dim, ss.data() + bounds[k], nullptr);
    CpuTable::find_or_insert_embeddings_group(cg, bounds, keys.data(), ec.data(), sc.data());
    CudaTable::find_or_insert_embeddings_group(gg, bounds, keys.data(), eg.data(), sg.data(), 0);
    CHECK(es == ec); CHECK(es == eg); CHECK(ss == sc); CHECK(ss == sg);
    std::vector<float> grads(total * dim); for (auto& x : grads) x = float(int(rng() % 2001) - 1000) / 300.f;
    std::vector<OptimizerStep> steps;
    for (int k = 0; k < 3; ++k) steps.push_back(OptimizerStep::make(kinds[k], 0.05, 1e-8, 0.9, 0.999, step));
    keys[bounds[2] + 3] = int64_t(rng() >> 2);  // absent from table 2: not found
    std::vector<char> fs(total), fc(total), fg(total);
    for (int k = 0; k < 3; ++k)
      single[k]->apply_optimizer(keys.data() + bounds[k], sizes[k], grads.data() + bounds[k] * dim, steps[k], (bool*)fs.data() + bounds[k]);
    CpuTable::apply_optimizer_group(cg, bounds, steps, keys.data(), grads.data(), (bool*)fc.data(), step != 2);
    CudaTable::apply_optimizer_group(gg, bounds, steps, keys.data(), grads.data(), (bool*)fg.data(), step != 2, 0);
    CHECK(fs == fc); CHECK(fs == fg); CHECK(!fs[bounds[2] + 3]);
    for (int k = 0; k < 3; ++k) {
      CHECK(contents_cpu(*single[k], vds[k]) == contents_cpu(*cgroup[k], vds[k]));
      CHECK(contents_cpu(*single[k], vds[k]) == contents_gpu(*ggroup[k], vds[k]));
    }
  }
  bool threw = false;
  try { CudaTable::find_or_insert_embeddings_group(gg, {0, 1, 2}, pool.data(), nullptr, nullptr, 0); } catch (const std::invalid_argument&) { threw = true; }
  CHECK(threw);
}

// insert_or_assign_evicting and find's scores: key by key into a full bucket (LRU, LFU, custom scores) the CUDA
// table reports the same victims (key, row, score) as the CPU table, and each victim is what the table held; a
// batch into full buckets loses nothing: what the table held plus the batch equals what it holds plus the victims.
void evicting() {
  const int dim = 3, vd = 7;
  for (ScorePolicy pol : {ScorePolicy::kLru, ScorePolicy::kLfu, ScorePolicy::kCustom}) {
    auto to = topt(dim, vd, 128, 128, pol, 1.0, Initializer{InitKind::kUniform, -1.f, 1.f, 2});
    CpuTable cpu(to); CudaTable gpu(gopt(to));
    std::mt19937_64 rng(17 + int(pol));
    std::vector<int64_t> keys(260); for (auto& k : keys) k = int64_t(rng() >> 3) + 9;
    for (int i = 0; i < 260; ++i) {
      cpu.set_step(1 + i / 8); gpu.set_step(1 + i / 8);
      if (i > 130 && i % 3 == 0) {  // touch an older key (found or not) and read its score
        const int64_t o = keys[rng() % i];
        std::vector<float> x(vd), y(vd); bool a, b; uint64_t sa = 7, sb = 9;
        cpu.find(&o, 1, x.data(), &a, true, &sa); gpu.find(&o, 1, y.data(), &b, true, 0, &sb);
        CHECK(a == b); CHECK(x == y); CHECK(sa == sb); CHECK(a || sa == 0);
        if (a) CHECK(contents_cpu(cpu, vd)[o].s == sa);
      }
      const auto before = contents_cpu(cpu, vd);
      std::vector<float> row(vd); for (auto& x : row) x = float(rng() % 1000) / 10.f;
      uint64_t sc = 1 + rng() % 60; const uint64_t* sp = pol == ScorePolicy::kLru ? nullptr : &sc;  // given scores: any policy
      int8_t a = -1, b = -1; int64_t ka = 1, kb = 2; std::vector<float> ra(vd, -1.f), rb(vd, -1.f); uint64_t sa = 0, sb = 0;
      cpu.insert_or_assign_evicting(&keys[i], 1, row.data(), &a, sp, &ka, ra.data(), &sa);
      gpu.insert_or_assign_evicting(&keys[i], 1, row.data(), &b, sp, &kb, rb.data(), &sb, 0);
      CHECK(a == b); CHECK(ka == kb);
      CHECK((a == int8_t(InsertStatus::kEvicted)) == (ka != kEmptyKey));
      if (a == int8_t(InsertStatus::kEvicted)) {
        CHECK(ra == rb); CHECK(sa == sb);
        CHECK(before.count(ka) == 1 && before.at(ka).v == ra && before.at(ka).s == sa);
        CHECK(contents_cpu(cpu, vd).count(ka) == 0);
      }
    }
    CHECK(contents_cpu(cpu, vd) == contents_gpu(gpu, vd));
    CHECK(cpu.evicted_count() == gpu.evicted_count(0) && cpu.evicted_count() > 0);
  }
  // A batch of distinct new keys into full buckets (LRU, newer step): conservation of keys, rows and scores.
  auto to = topt(dim, vd, 256, 256, ScorePolicy::kLru, 1.0);
  CudaTable gpu(gopt(to)); CpuTable cpu(to);
  std::mt19937_64 rng(23);
  std::vector<int64_t> old(256); for (auto& k : old) k = int64_t(rng() >> 2);
  std::vector<float> rows(256 * vd); for (auto& x : rows) x = float(rng() % 999);
  std::vector<int8_t> st(256);
  gpu.set_step(1); cpu.set_step(1);
  gpu.insert_or_assign(old.data(), 256, rows.data(), st.data(), nullptr, 0);
  cpu.insert_or_assign(old.data(), 256, rows.data(), st.data(), nullptr);
  for (int side = 0; side < 2; ++side) {
    const auto before = side ? contents_gpu(gpu, vd) : contents_cpu(cpu, vd);
    std::vector<int64_t> nw(150); for (auto& k : nw) k = int64_t(rng() >> 2);
    std::vector<float> nv(150 * vd); for (auto& x : nv) x = float(rng() % 999) + 0.5f;
    std::vector<int8_t> ns(150); std::vector<int64_t> ek(150); std::vector<float> ev(150 * vd); std::vector<uint64_t> es(150);
    if (side) { gpu.set_step(2); gpu.insert_or_assign_evicting(nw.data(), 150, nv.data(), ns.data(), nullptr, ek.data(), ev.data(), es.data(), 0); }
    else { cpu.set_step(2); cpu.insert_or_assign_evicting(nw.data(), 150, nv.data(), ns.data(), nullptr, ek.data(), ev.data(), es.data()); }
    const auto after = side ? contents_gpu(gpu, vd) : contents_cpu(cpu, vd);
    std::map<int64_t, Row> lhs = before, rhs = after;
    for (int i = 0; i < 150; ++i) {
      if (ns[i] != int8_t(InsertStatus::kRejected)) lhs[nw[i]] = Row{{nv.begin() + i * vd, nv.begin() + (i + 1) * vd}, 2};
      else CHECK(after.count(nw[i]) == 0);
      CHECK((ns[i] == int8_t(InsertStatus::kEvicted)) == (ek[i] != kEmptyKey));
      if (ek[i] != kEmptyKey) { CHECK(rhs.count(ek[i]) == 0); rhs[ek[i]] = Row{{ev.begin() + i * vd, ev.begin() + (i + 1) * vd}, es[i]}; }
    }
    CHECK(lhs == rhs);
    CHECK(std::count(ns.begin(), ns.end(), int8_t(InsertStatus::kEvicted)) > 0);
  }
}

int main() {
  groups(); std::printf("groups done\n");
  embeddings_only(); std::printf("embeddings only done\n");
  optimizers(); std::printf("optimizers done\n");
  inits(); std::printf("inits done\n");
  for (auto p : {ScorePolicy::kLru, ScorePolicy::kLfu, ScorePolicy::kEpochLru, ScorePolicy::kEpochLfu}) { twin(p, 1 + int(p)); std::printf("twin %d done\n", int(p)); }
  dups(); std::printf("dups done\n");
  for (auto p : {ScorePolicy::kLru, ScorePolicy::kLfu, ScorePolicy::kEpochLru, ScorePolicy::kEpochLfu, ScorePolicy::kCustom, ScorePolicy::kNone}) eviction(p);
  full_batch(); std::printf("full batch done\n");
  hybrid(); std::printf("hybrid done\n");
  evicting(); std::printf("evicting done\n");
  std::printf("failures: %d\n", failures);
  return failures != 0;
}
