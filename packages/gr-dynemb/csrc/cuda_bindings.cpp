// Python binding of the CUDA table (compiled only when the package is built with CUDA). Arrays cross as raw device
// addresses (torch tensors' data_ptr()) and the stream as its integer handle, so no torch or CUDA headers are needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "binding_utils.h"
#include "table/cuda_table.h"

namespace py = pybind11;

namespace gr_dynemb {

using binding::OptimizerParams;
using binding::optimizer_steps;
using binding::ptr;

void register_cuda_table(py::module_& m) {
  py::class_<CudaTable>(m, "CudaTable")
      .def(py::init([](int64_t capacity, int64_t max_capacity, int dim, int value_dim, int policy, int init_kind,
                       float init_a, float init_b, uint64_t seed, double max_load_factor, int64_t hbm_budget_bytes,
                       int device) {
             CudaTableOptions o;
             static_cast<TableShape&>(o) = TableShape::from_codes(capacity, max_capacity, dim, value_dim, policy,
                                                                  init_kind, init_a, init_b, seed, max_load_factor);
             o.hbm_budget_bytes = hbm_budget_bytes;
             if (device < 0) throw std::invalid_argument("device must be a CUDA device index >= 0");
             o.device = device;
             py::gil_scoped_release nogil;
             return new CudaTable(o);
           }),
           py::arg("capacity"), py::arg("max_capacity"), py::arg("dim"), py::arg("value_dim"), py::arg("policy"),
           py::arg("init_kind"), py::arg("init_a"), py::arg("init_b"), py::arg("seed"), py::arg("max_load_factor"),
           py::arg("hbm_budget_bytes"), py::arg("device"))
      .def("size", &CudaTable::size, py::call_guard<py::gil_scoped_release>())
      .def("capacity", &CudaTable::capacity)
      .def("hbm_slots", &CudaTable::hbm_slots)
      .def("load_factor", &CudaTable::load_factor, py::call_guard<py::gil_scoped_release>())
      .def("set_step", &CudaTable::set_step)
      .def("set_epoch", &CudaTable::set_epoch)
      .def("evicted_count", &CudaTable::evicted_count, py::call_guard<py::gil_scoped_release>())
      .def("rejected_count", &CudaTable::rejected_count, py::call_guard<py::gil_scoped_release>())
      .def("take_reserved_count", &CudaTable::take_reserved_count, py::call_guard<py::gil_scoped_release>())
      .def("find",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t found, bool touch,
              std::uintptr_t scores_out, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.find(ptr<const int64_t>(keys), n, ptr<float>(values), ptr<bool>(found), touch, stream,
                    ptr<uint64_t>(scores_out));
           })
      .def("locate",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t slots, std::uintptr_t found, bool touch,
              std::uintptr_t scores_out, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.locate(ptr<const int64_t>(keys), n, ptr<int64_t>(slots), ptr<bool>(found), touch, stream,
                      ptr<uint64_t>(scores_out));
           })
      .def("gather_rows",
           [](CudaTable& t, std::uintptr_t sorted_slots, std::uintptr_t order, int64_t n, std::uintptr_t values,
              std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.gather_rows(ptr<const int64_t>(sorted_slots), ptr<const int64_t>(order), n, ptr<float>(values), stream);
           })
      .def("find_or_insert",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t status,
              std::uintptr_t scores, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.find_or_insert(ptr<const int64_t>(keys), n, ptr<float>(values), ptr<int8_t>(status),
                              ptr<const uint64_t>(scores), stream);
           })
      .def("find_or_insert_embeddings",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t embeddings, std::uintptr_t status,
              std::uintptr_t scores, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.find_or_insert_embeddings(ptr<const int64_t>(keys), n, ptr<float>(embeddings), ptr<int8_t>(status),
                                         ptr<const uint64_t>(scores), stream);
           })
      .def("insert_or_assign",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t status,
              std::uintptr_t scores, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.insert_or_assign(ptr<const int64_t>(keys), n, ptr<const float>(values), ptr<int8_t>(status),
                                ptr<const uint64_t>(scores), stream);
           })
      .def("insert_or_assign_evicting",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t status,
              std::uintptr_t scores, std::uintptr_t evicted_keys, std::uintptr_t evicted_values,
              std::uintptr_t evicted_scores, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.insert_or_assign_evicting(ptr<const int64_t>(keys), n, ptr<const float>(values), ptr<int8_t>(status),
                                         ptr<const uint64_t>(scores), ptr<int64_t>(evicted_keys),
                                         ptr<float>(evicted_values), ptr<uint64_t>(evicted_scores), stream);
           })
      .def("assign",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t values, std::uintptr_t found,
              std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.assign(ptr<const int64_t>(keys), n, ptr<const float>(values), ptr<bool>(found), stream);
           })
      .def("apply_optimizer",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t grads, int kind, double lr, double eps,
              double beta1, double beta2, int64_t step, std::uintptr_t found, bool distinct,
              std::uintptr_t stream) {
             const OptimizerStep o = OptimizerStep::make(kind, lr, eps, beta1, beta2, step);
             py::gil_scoped_release nogil;
             t.apply_optimizer(ptr<const int64_t>(keys), n, ptr<const float>(grads), o, ptr<bool>(found), distinct,
                               stream);
           })
      .def("accumulate",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t delta, std::uintptr_t found,
              std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             t.accumulate(ptr<const int64_t>(keys), n, ptr<const float>(delta), ptr<bool>(found), stream);
           })
      .def_static(
          "find_or_insert_embeddings_group",
          [](const std::vector<CudaTable*>& tables, const std::vector<int64_t>& bounds, std::uintptr_t keys,
             std::uintptr_t embeddings, std::uintptr_t status, std::uintptr_t stream) {
            py::gil_scoped_release nogil;
            CudaTable::find_or_insert_embeddings_group(tables, bounds, ptr<const int64_t>(keys),
                                                       ptr<float>(embeddings), ptr<int8_t>(status), stream);
          })
      .def_static(
          "apply_optimizer_group",
          [](const std::vector<CudaTable*>& tables, const std::vector<int64_t>& bounds,
             const std::vector<OptimizerParams>& params, std::uintptr_t keys, std::uintptr_t grads,
             std::uintptr_t found, bool distinct, std::uintptr_t stream) {
            const std::vector<OptimizerStep> steps = optimizer_steps(params);
            py::gil_scoped_release nogil;
            CudaTable::apply_optimizer_group(tables, bounds, steps, ptr<const int64_t>(keys),
                                             ptr<const float>(grads), ptr<bool>(found), distinct, stream);
          })
      .def("erase",
           [](CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             return t.erase(ptr<const int64_t>(keys), n, stream);
           })
      .def("erase_if_score_below", &CudaTable::erase_if_score_below, py::call_guard<py::gil_scoped_release>())
      .def("count_if_score_at_least", &CudaTable::count_if_score_at_least, py::call_guard<py::gil_scoped_release>())
      .def("export_if_score_at_least",
           [](CudaTable& t, uint64_t threshold, std::uintptr_t keys, std::uintptr_t values, std::uintptr_t scores,
              int64_t max_n, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             return t.export_if_score_at_least(threshold, ptr<int64_t>(keys), ptr<float>(values),
                                               ptr<uint64_t>(scores), max_n, stream);
           })
      .def("reserve", &CudaTable::reserve, py::call_guard<py::gil_scoped_release>())
      .def("clear", &CudaTable::clear, py::call_guard<py::gil_scoped_release>())
      .def("initial_rows", [](const CudaTable& t, std::uintptr_t keys, int64_t n, std::uintptr_t rows,
                              std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        t.initial_rows(ptr<const int64_t>(keys), n, ptr<float>(rows), stream);
      });
}

}  // namespace gr_dynemb
