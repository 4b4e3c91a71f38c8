// Python binding of the dynamic table. Arrays cross as raw addresses of contiguous host buffers (torch tensors'
// data_ptr()), so no torch C++ headers are needed and one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "binding_utils.h"
#include "table/cpu_table.h"
#include "table/hash.h"

namespace py = pybind11;
using namespace gr_dynemb;

#ifdef GR_DYNEMB_WITH_CUDA
namespace gr_dynemb {
void register_cuda_table(py::module_& m);  // csrc/cuda_bindings.cpp
}
#endif

using binding::OptimizerParams;
using binding::optimizer_steps;
using binding::ptr;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gr_dynemb native hash tables";
  m.attr("EMPTY_KEY") = kEmptyKey;
  m.attr("ERASED_KEY") = kErasedKey;
  m.attr("BUCKET_SIZE") = kBucketSize;
  m.attr("MAX_GROUP_TABLES") = kMaxGroupTables;
#ifdef GR_DYNEMB_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  register_cuda_table(m);
#else
  m.attr("WITH_CUDA") = false;
#endif

  m.def(
      "owner_ranks",
      [](std::uintptr_t keys, int64_t n, int64_t world_size, std::uintptr_t out) {
        if (world_size <= 0) throw std::invalid_argument("world_size must be positive");
        const auto* k = ptr<const int64_t>(keys);
        auto* o = ptr<int64_t>(out);
        py::gil_scoped_release nogil;
        for (int64_t i = 0; i < n; ++i) o[i] = owner_rank(k[i], world_size);
      },
      "rank owning each key among world_size shards (row-wise sharding by key hash)");

  py::class_<CpuTable>(m, "CpuTable")
      .def(py::init([](int64_t capacity, int64_t max_capacity, int dim, int value_dim, int policy, int init_kind,
                       float init_a, float init_b, uint64_t seed, double max_load_factor, int num_threads) {
             TableOptions o;
             static_cast<TableShape&>(o) = TableShape::from_codes(capacity, max_capacity, dim, value_dim, policy,
                                                                  init_kind, init_a, init_b, seed, max_load_factor);
             o.num_threads = num_threads;
             return new CpuTable(o);
           }),
           py::arg("capacity"), py::arg("max_capacity"), py::arg("dim"), py::arg("value_dim"), py::arg("policy"),
           py::arg("init_kind"), py::arg("init_a"), py::arg("init_b"), py::arg("seed"), py::arg("max_load_factor"),
           py::arg("num_threads"))
      .def("size", &CpuTable::size)
      .def("capacity", &CpuTable::capacity)
      .def("load_factor", &CpuTable::load_factor)
      .def("set_step", &CpuTable::set_step)
      .def("set_epoch", &CpuTable::set_epoch)
      .def("evicted_count", &CpuTable::evicted_count)
      .def("rejected_count", &CpuTable::rejected_count)
      .def("take_reserved_count", &CpuTable::take_reserved_count)
      .def("find",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t found, bool touch,
              std::uintptr_t scores_out) {
             py::gil_scoped_release nogil;
             t.find(ptr<const int64_t>(keys), n, ptr<float>(values), ptr<bool>(found), touch,
                    ptr<uint64_t>(scores_out));
           })
      .def("find_or_insert",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t status,
              std::uintptr_t scores) {
             py::gil_scoped_release nogil;
             t.find_or_insert(ptr<const int64_t>(keys), n, ptr<float>(values), ptr<int8_t>(status),
                              ptr<const uint64_t>(scores));
           })
      .def("find_or_insert_embeddings",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t embeddings, std::uintptr_t status,
              std::uintptr_t scores) {
             py::gil_scoped_release nogil;
             t.find_or_insert_embeddings(ptr<const int64_t>(keys), n, ptr<float>(embeddings), ptr<int8_t>(status),
                                         ptr<const uint64_t>(scores));
           })
      .def("insert_or_assign",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t status,
              std::uintptr_t scores) {
             py::gil_scoped_release nogil;
             t.insert_or_assign(ptr<const int64_t>(keys), n, ptr<const float>(values), ptr<int8_t>(status),
                                ptr<const uint64_t>(scores));
           })
      .def("insert_or_assign_evicting",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t status,
              std::uintptr_t scores, std::uintptr_t evicted_keys, std::uintptr_t evicted_values,
              std::uintptr_t evicted_scores) {
             py::gil_scoped_release nogil;
             t.insert_or_assign_evicting(ptr<const int64_t>(keys), n, ptr<const float>(values), ptr<int8_t>(status),
                                         ptr<const uint64_t>(scores), ptr<int64_t>(evicted_keys),
                                         ptr<float>(evicted_values), ptr<uint64_t>(evicted_scores));
           })
      .def("assign",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t found) {
             py::gil_scoped_release nogil;
             t.assign(ptr<const int64_t>(keys), n, ptr<const float>(values), ptr<bool>(found));
           })
      .def("apply_optimizer",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t grads, int kind, double lr, double eps,
              double beta1, double beta2, int64_t step, std::uintptr_t found, bool distinct) {
             const OptimizerStep o = OptimizerStep::make(kind, lr, eps, beta1, beta2, step);
             py::gil_scoped_release nogil;
             t.apply_optimizer(ptr<const int64_t>(keys), n, ptr<const float>(grads), o, ptr<bool>(found), distinct);
           })
      .def("accumulate",
           [](CpuTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t delta, std::uintptr_t found) {
             py::gil_scoped_release nogil;
             t.accumulate(ptr<const int64_t>(keys), n, ptr<const float>(delta), ptr<bool>(found));
           })
      .def_static(
          "find_or_insert_embeddings_group",
          [](const std::vector<CpuTable*>& tables, const std::vector<int64_t>& bounds, std::uintptr_t keys,
             std::uintptr_t embeddings, std::uintptr_t status) {
            py::gil_scoped_release nogil;
            CpuTable::find_or_insert_embeddings_group(tables, bounds, ptr<const int64_t>(keys), ptr<float>(embeddings),
                                                      ptr<int8_t>(status));
          })
      .def_static(
          "apply_optimizer_group",
          [](const std::vector<CpuTable*>& tables, const std::vector<int64_t>& bounds,
             const std::vector<OptimizerParams>& params, std::uintptr_t keys, std::uintptr_t grads,
             std::uintptr_t found, bool distinct) {
            const std::vector<OptimizerStep> steps = optimizer_steps(params);
            py::gil_scoped_release nogil;
            CpuTable::apply_optimizer_group(tables, bounds, steps, ptr<const int64_t>(keys), ptr<const float>(grads),
                                            ptr<bool>(found), distinct);
          })
      .def("erase", [](CpuTable& t, std::uintptr_t keys, int64_t n) { return t.erase(ptr<const int64_t>(keys), n); })
      .def("erase_if_score_below", &CpuTable::erase_if_score_below)
      .def("count_if_score_at_least", &CpuTable::count_if_score_at_least)
      .def("export_if_score_at_least",
           [](const CpuTable& t, uint64_t threshold, std::uintptr_t keys, std::uintptr_t values, std::uintptr_t scores,
              int64_t max_n) {
             return t.export_if_score_at_least(threshold, ptr<int64_t>(keys), ptr<float>(values),
                                               ptr<uint64_t>(scores), max_n);
           })
      .def("reserve", &CpuTable::reserve)
      .def("clear", &CpuTable::clear)
      .def("initial_row", [](const CpuTable& t, int64_t key, std::uintptr_t row) { t.initial_row(key, ptr<float>(row)); });
}
