// Python bindings of the gradient queue (module ringmaster_kernels._queue).
//
// Thin on purpose: argument checks that name the argument, the GIL dance, and
// conversion of records; the logic lives in ringmaster/queue.hpp.
//
// pybind11 builds the module, the exception and the test/benchmark entry points.
// The GradientQueue type itself uses the CPython API with METH_FASTCALL methods:
// pybind11's dispatcher costs about 200 ns per call here, more than a whole
// queue.SimpleQueue put+get pair, and the queue must stay within 2x of that.
//
// Non-blocking attempts run with the GIL held (releasing it costs more than the
// attempt) and are bounded: no call spins with the GIL held. Waits release it, and
// wake every 100 ms so that Ctrl-C gets through.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cxxabi.h>

#include <algorithm>
#include <array>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ringmaster/harness.hpp"
#include "ringmaster/queue.hpp"

namespace py = pybind11;
using ringmaster::Deadline;
using ringmaster::GradientQueue;
using ringmaster::Record;

namespace {

constexpr double kSignalCheckSeconds = 0.1;
constexpr std::uint64_t kU64Max = ~std::uint64_t{0};
constexpr std::uint64_t kMaxBatch = std::uint64_t{1} << 24;

PyTypeObject* record_type = nullptr;
PyObject* queue_closed_type = nullptr;

// ---- conversions -------------------------------------------------------------

// Record is a collections.namedtuple built at import. Instances are made here the
// way tuple.__new__ makes them for a subclass (tp_alloc, then the items), which
// avoids calling the class from C; a structseq would be simpler to declare but
// costs two type-dict lookups per creation and per deallocation on CPython 3.11,
// half the time of a pop_many.
PyObject* new_record(const Record& r) {
  PyObject* obj = record_type->tp_alloc(record_type, 3);
  if (obj == nullptr) throw py::error_already_set();
  PyObject* items[3] = {PyLong_FromUnsignedLong(r.slot), PyLong_FromUnsignedLong(r.worker),
                        PyLong_FromUnsignedLongLong(r.version)};
  for (int i = 0; i < 3; ++i) {
    if (items[i] == nullptr) {
      for (int j = i + 1; j < 3; ++j) Py_XDECREF(items[j]);
      Py_DECREF(obj);
      throw py::error_already_set();
    }
    PyTuple_SET_ITEM(obj, i, items[i]);
  }
  // Three ints cannot form a reference cycle; untracked, a pop_many of thousands
  // of records does not set off collections of the young generation.
  PyObject_GC_UnTrack(obj);
  return obj;
}

PyObject* record_or_none(const std::optional<Record>& r) {
  if (r) return new_record(*r);
  Py_RETURN_NONE;
}

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

// An int (or anything with __index__, but not a bool) in [min, max].
std::uint64_t as_uint(PyObject* obj, const char* name, std::uint64_t max, std::uint64_t min = 0) {
  if (PyLong_CheckExact(obj)) {  // the common case, without the __index__ round trip
    const unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value <= max && value >= min && !(value == static_cast<unsigned long long>(-1) && PyErr_Occurred())) {
      return value;
    }
    PyErr_Clear();  // fall through to the full path for the error message
  }
  if (PyBool_Check(obj) || !(PyLong_Check(obj) || PyIndex_Check(obj))) {
    throw py::type_error(std::string(name) + ": must be an int, got " + type_name(obj));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj));
  if (!index) throw py::error_already_set();
  const unsigned long long value = PyLong_AsUnsignedLongLong(index.ptr());
  const bool overflow = value == static_cast<unsigned long long>(-1) && PyErr_Occurred();
  if (overflow) PyErr_Clear();  // negative or >= 2**64
  if (overflow || value > max || value < min) {
    throw py::value_error(std::string(name) + ": must be in [" + ringmaster::bound_text(min) + ", " +
                          ringmaster::bound_text(max) + "], got " + py::str(index).cast<std::string>());
  }
  return value;
}

std::uint64_t as_positive(PyObject* obj, const char* name, std::uint64_t max) { return as_uint(obj, name, max, 1); }

// nullptr (argument not given) and None both mean "wait forever".
Deadline as_deadline(PyObject* timeout) {
  if (timeout == nullptr || timeout == Py_None) return Deadline::never();
  if (PyBool_Check(timeout) || !(PyFloat_Check(timeout) || PyLong_Check(timeout))) {
    throw py::type_error("timeout: must be None or a number of seconds, got " + type_name(timeout));
  }
  double seconds = PyFloat_AsDouble(timeout);
  if (seconds == -1.0 && PyErr_Occurred()) {
    // Only an int beyond the float range gets here: by its sign, forever (as
    // float('inf') is) or a negative timeout.
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    const int negative = PyObject_RichCompareBool(timeout, py::int_(0).ptr(), Py_LT);
    if (negative < 0) throw py::error_already_set();
    seconds = negative ? -1.0 : std::numeric_limits<double>::infinity();
  }
  if (!(seconds >= 0.0)) {  // also rejects NaN
    throw py::value_error("timeout: must be None or >= 0 seconds, got " +
                          py::repr(py::handle(timeout)).cast<std::string>());
  }
  return Deadline::after(seconds);
}

std::uint32_t as_slot(PyObject* slot, const GradientQueue& q) {
  return static_cast<std::uint32_t>(as_uint(slot, "slot", q.num_slots() - 1));
}

Record as_record(PyObject* slot, PyObject* worker, PyObject* version, const GradientQueue& q) {
  return Record{as_slot(slot, q), static_cast<std::uint32_t>(as_uint(worker, "worker", q.num_workers() - 1)),
                as_uint(version, "version", kU64Max)};
}

// Positional-or-keyword arguments of a METH_FASTCALL | METH_KEYWORDS method; the
// first `required` are mandatory, the others come back as nullptr when absent.
template <std::size_t N>
std::array<PyObject*, N> parse_args(const char* method, const std::array<const char*, N>& names,
                                    std::size_t required, PyObject* const* args, Py_ssize_t nargs,
                                    PyObject* kwnames) {
  std::array<PyObject*, N> out{};
  if (static_cast<std::size_t>(nargs) > N) {
    throw py::type_error(std::string(method) + "() takes at most " + std::to_string(N) + " arguments (" +
                         std::to_string(nargs) + " given)");
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
  const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    std::size_t j = 0;
    while (j < N && PyUnicode_CompareWithASCIIString(key, names[j]) != 0) ++j;
    if (j == N) {
      throw py::type_error(std::string(method) + "() got an unexpected keyword argument '" +
                           py::str(key).cast<std::string>() + "'");
    }
    if (out[j] != nullptr) {
      throw py::type_error(std::string(method) + "() got multiple values for argument '" + names[j] + "'");
    }
    out[j] = args[nargs + k];
  }
  for (std::size_t j = 0; j < required; ++j) {
    if (out[j] == nullptr) {
      throw py::type_error(std::string(method) + "() missing required argument '" + names[j] + "'");
    }
  }
  return out;
}

// Sets the Python exception for the C++ exception in flight; returns nullptr.
PyObject* raise_current() {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const ringmaster::QueueClosed& e) {
    PyErr_SetString(queue_closed_type, e.what());
  } catch (const ringmaster::OutOfMemory& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// Turns C++ exceptions into Python ones, except the forced unwind by which
// pthread_exit ends a thread that takes the GIL back while the interpreter shuts
// down (a daemon thread waiting in the queue at exit): that one must pass on, and
// so this is not noexcept (unwinding into a noexcept frame is std::terminate).
template <class F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (abi::__forced_unwind&) {
    throw;
  } catch (...) {
    return raise_current();
  }
}

// fn() with the GIL released. Not py::gil_scoped_release: its destructor takes the
// GIL back, and a forced unwind (see guarded) starting in a destructor, which is
// implicitly noexcept, aborts the process.
template <class F>
auto without_gil(F&& fn) -> decltype(fn()) {
  PyThreadState* const state = PyEval_SaveThread();
  std::optional<decltype(fn())> result;
  try {
    result.emplace(fn());
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  // Outside the try: the forced unwind starts in here.
  PyEval_RestoreThread(state);
  return std::move(*result);
}

// Runs op(deadline): one attempt with the GIL held; then, while the timeout
// allows, waits with the GIL released in slices of kSignalCheckSeconds.
template <class Op>
auto blocking(PyObject* timeout, Op&& op) -> decltype(op(Deadline::now())) {
  const Deadline deadline = as_deadline(timeout);
  auto result = op(Deadline::now());
  if (result || deadline.expired()) return result;
  for (;;) {
    const Deadline slice = deadline.earliest(Deadline::after(kSignalCheckSeconds));
    result = without_gil([&] { return op(slice); });
    if (result || deadline.expired()) return result;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

// ---- the GradientQueue type ---------------------------------------------------

struct QueueObject {
  PyObject_HEAD GradientQueue* queue;
};

GradientQueue& queue_of(PyObject* self) { return *reinterpret_cast<QueueObject*>(self)->queue; }

PyObject* bool_object(bool b) { return Py_NewRef(b ? Py_True : Py_False); }

PyObject* queue_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"capacity", "num_slots", "num_workers", nullptr};
  PyObject *capacity, *num_slots, *num_workers;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:GradientQueue", const_cast<char**>(keywords), &capacity,
                                   &num_slots, &num_workers)) {
    return nullptr;
  }
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  PyObject* ok = guarded([&]() -> PyObject* {
    reinterpret_cast<QueueObject*>(self)->queue =
        new GradientQueue(as_positive(capacity, "capacity", GradientQueue::kMaxCapacity),
                          as_positive(num_slots, "num_slots", GradientQueue::kMaxSlots),
                          as_positive(num_workers, "num_workers", GradientQueue::kMaxWorkers));
    return self;
  });
  if (ok == nullptr) Py_DECREF(self);
  return ok;
}

void queue_dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  delete reinterpret_cast<QueueObject*>(self)->queue;
  type->tp_free(self);
  Py_DECREF(type);
}

PyObject* queue_repr(PyObject* self) {
  const GradientQueue& q = queue_of(self);
  return PyUnicode_FromFormat("GradientQueue(capacity=%llu, num_slots=%u, num_workers=%u)",
                              static_cast<unsigned long long>(q.capacity()), q.num_slots(), q.num_workers());
}

Py_ssize_t queue_len(PyObject* self) { return static_cast<Py_ssize_t>(queue_of(self).size()); }

#define FASTCALL_ARGS PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames

PyObject* queue_acquire_slot(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<1>("acquire_slot", {"timeout"}, 0, args, nargs, kwnames);
    GradientQueue& q = queue_of(self);
    const auto slot = blocking(a[0], [&](Deadline d) { return q.acquire_slot(d); });
    if (!slot) Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(*slot);
  });
}

PyObject* queue_release_slot(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<1>("release_slot", {"slot"}, 1, args, nargs, kwnames);
    GradientQueue& q = queue_of(self);
    const std::uint32_t slot = as_slot(a[0], q);
    q.begin_release(slot);
    // Rarely needed (see try_finish_release), and then with the GIL let go: the
    // thread this waits for may be one that needs the GIL to get on.
    if (!q.try_finish_release(slot)) {
      without_gil([&] {
        while (!q.try_finish_release(slot)) std::this_thread::yield();
        return true;
      });
    }
    Py_RETURN_NONE;
  });
}

PyObject* queue_push(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<4>("push", {"slot", "worker", "version", "timeout"}, 3, args, nargs, kwnames);
    GradientQueue& q = queue_of(self);
    const Record r = as_record(a[0], a[1], a[2], q);
    return bool_object(blocking(a[3], [&](Deadline d) { return q.push(r, d); }));
  });
}

PyObject* queue_try_push(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<3>("try_push", {"slot", "worker", "version"}, 3, args, nargs, kwnames);
    GradientQueue& q = queue_of(self);
    return bool_object(q.push(as_record(a[0], a[1], a[2], q), Deadline::now()));
  });
}

PyObject* queue_pop(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<1>("pop", {"timeout"}, 0, args, nargs, kwnames);
    GradientQueue& q = queue_of(self);
    return record_or_none(blocking(a[0], [&](Deadline d) { return q.pop(d); }));
  });
}

PyObject* queue_try_pop(PyObject* self, PyObject*) {
  return guarded([&]() -> PyObject* { return record_or_none(queue_of(self).pop(Deadline::now())); });
}

PyObject* queue_pop_fresh(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<2>("pop_fresh", {"max_delay", "timeout"}, 1, args, nargs, kwnames);
    const std::uint64_t max_delay = as_positive(a[0], "max_delay", kU64Max);
    GradientQueue& q = queue_of(self);
    return record_or_none(blocking(a[1], [&](Deadline d) { return q.pop_fresh(max_delay, d); }));
  });
}

// The batched pop shared by pop_many and pop_into: waits per `timeout` for one
// record, then takes up to max_n ready ones. The records land in a scratch array,
// not in the caller's object, because the wait runs without the GIL.
struct Batch {
  std::unique_ptr<Record[]> records;
  std::size_t size = 0;
};

Batch pop_batch(GradientQueue& q, std::uint64_t max_n, PyObject* timeout) {
  // Never more than the ring holds, so a huge max_n costs no huge buffer.
  const std::size_t room = static_cast<std::size_t>(std::min<std::uint64_t>(max_n, q.capacity()));
  Batch batch{std::unique_ptr<Record[]>(new Record[room])};
  batch.size = blocking(timeout, [&](Deadline d) { return q.pop_many(batch.records.get(), room, d); });
  return batch;
}

PyObject* queue_pop_many(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<2>("pop_many", {"max_n", "timeout"}, 1, args, nargs, kwnames);
    const std::uint64_t max_n = as_positive(a[0], "max_n", kMaxBatch);
    const Batch batch = pop_batch(queue_of(self), max_n, a[1]);
    py::list out(batch.size);
    for (std::size_t i = 0; i < batch.size; ++i) PyList_SET_ITEM(out.ptr(), i, new_record(batch.records[i]));
    return out.release().ptr();
  });
}

// A caller's buffer held for the length of a call (PyBuffer_Release on the way out).
class BufferView {
 public:
  BufferView(PyObject* obj, const char* name) {
    // Strides and format are requested so that every problem below gets its own
    // message; asking for a writable C-contiguous buffer upfront would give the
    // exporter's generic BufferError instead.
    if (PyObject_GetBuffer(obj, &view_, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      throw py::type_error(std::string(name) +
                           ": must support the buffer protocol (a numpy array; a torch tensor via .numpy()), got " +
                           type_name(obj));
    }
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  const Py_buffer& operator*() const { return view_; }

 private:
  Py_buffer view_;
};

// Whether a struct-module format code describes a native 8-byte integer
// ('q'/'Q', or 'l'/'L', which numpy uses for int64/uint64 on LP64 systems).
bool is_native_int64(const Py_buffer& view) {
  if (view.itemsize != 8 || view.format == nullptr) return false;
  const char* f = view.format;
  if (*f == '@' || *f == '=' || (*f == '<' && PY_LITTLE_ENDIAN) || (*f == '>' && !PY_LITTLE_ENDIAN)) ++f;
  return (f[0] == 'q' || f[0] == 'Q' || f[0] == 'l' || f[0] == 'L') && f[1] == '\0';
}

PyObject* queue_pop_into(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<2>("pop_into", {"out", "timeout"}, 1, args, nargs, kwnames);
    const BufferView buffer(a[0], "out");
    const Py_buffer& v = *buffer;
    if (!is_native_int64(v)) {
      throw py::type_error(std::string("out: must hold native int64 or uint64 items, got format '") +
                           (v.format ? v.format : "B") + "' of " + std::to_string(v.itemsize) + " bytes");
    }
    if (v.ndim != 2 || v.shape[1] != 3 || v.shape[0] < 1) {
      std::string shape;
      for (int d = 0; d < v.ndim; ++d) shape += (d ? ", " : "") + std::to_string(v.shape[d]);
      throw py::value_error("out: must have shape (n, 3) with n >= 1, got (" + shape + ")");
    }
    if (v.readonly) throw py::value_error("out: must be writable, got a read-only buffer");
    if (!PyBuffer_IsContiguous(&v, 'C')) throw py::value_error("out: must be C-contiguous");
    const std::uint64_t max_n = std::min<std::uint64_t>(static_cast<std::uint64_t>(v.shape[0]), kMaxBatch);
    const Batch batch = pop_batch(queue_of(self), max_n, a[1]);
    auto* row = static_cast<std::uint64_t*>(v.buf);
    for (std::size_t i = 0; i < batch.size; ++i, row += 3) {
      row[0] = batch.records[i].slot;
      row[1] = batch.records[i].worker;
      row[2] = batch.records[i].version;
    }
    return PyLong_FromSize_t(batch.size);
  });
}

PyObject* queue_bump_version(PyObject* self, PyObject*) {
  return guarded([&]() -> PyObject* { return PyLong_FromUnsignedLongLong(queue_of(self).bump_version()); });
}

PyObject* queue_set_version(FASTCALL_ARGS) {
  return guarded([&]() -> PyObject* {
    const auto a = parse_args<1>("set_version", {"version"}, 1, args, nargs, kwnames);
    queue_of(self).set_version(as_uint(a[0], "version", kU64Max));
    Py_RETURN_NONE;
  });
}

PyObject* queue_close(PyObject* self, PyObject*) {
  return guarded([&]() -> PyObject* {
    queue_of(self).close();
    Py_RETURN_NONE;
  });
}

PyObject* queue_stats(PyObject* self, PyObject*) {
  return guarded([&]() -> PyObject* {
    const GradientQueue& q = queue_of(self);
    const ringmaster::QueueStats s = q.stats();
    py::list per_worker;
    for (const auto& w : s.per_worker) {
      py::dict d;
      d["pushed"] = w.pushed;
      d["popped"] = w.popped;
      d["discarded"] = w.discarded;
      per_worker.append(d);
    }
    py::dict d;
    d["pushed"] = s.pushed;
    d["popped"] = s.popped;
    d["discarded"] = s.discarded;
    d["queued"] = q.size();
    d["free_slots"] = q.free_slots();
    d["version"] = q.version();
    d["per_worker"] = per_worker;
    return d.release().ptr();
  });
}

PyObject* get_version(PyObject* self, void*) { return PyLong_FromUnsignedLongLong(queue_of(self).version()); }
PyObject* get_closed(PyObject* self, void*) { return bool_object(queue_of(self).closed()); }
PyObject* get_capacity(PyObject* self, void*) { return PyLong_FromUnsignedLongLong(queue_of(self).capacity()); }
PyObject* get_num_slots(PyObject* self, void*) { return PyLong_FromUnsignedLong(queue_of(self).num_slots()); }
PyObject* get_num_workers(PyObject* self, void*) { return PyLong_FromUnsignedLong(queue_of(self).num_workers()); }
PyObject* get_free_slots(PyObject* self, void*) { return PyLong_FromUnsignedLongLong(queue_of(self).free_slots()); }

#define FASTCALL_METHOD(name, doc) \
  { #name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(queue_##name)), METH_FASTCALL | METH_KEYWORDS, doc }
#define NOARGS_METHOD(name, doc) \
  { #name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(queue_##name)), METH_NOARGS, doc }

PyMethodDef queue_methods[] = {
    FASTCALL_METHOD(acquire_slot,
                    "acquire_slot(timeout=None) -> int | None\n\nTakes a free slot, waiting up to `timeout` seconds "
                    "(None: forever, 0: no wait). None on timeout; QueueClosed after close()."),
    FASTCALL_METHOD(release_slot,
                    "release_slot(slot) -> None\n\nReturns a slot to the pool. ValueError if out of range or "
                    "already free. Allowed after close()."),
    FASTCALL_METHOD(push,
                    "push(slot, worker, version, timeout=None) -> bool\n\nPublishes a record for an acquired "
                    "slot, waiting for room up to `timeout` seconds. False on timeout; QueueClosed after close()."),
    FASTCALL_METHOD(try_push, "try_push(slot, worker, version) -> bool\n\npush() without waiting: False if full."),
    FASTCALL_METHOD(pop,
                    "pop(timeout=None) -> Record | None\n\nThe oldest record, waiting up to `timeout` seconds. "
                    "None on timeout; QueueClosed once closed and empty."),
    NOARGS_METHOD(try_pop, "try_pop() -> Record | None\n\npop() without waiting."),
    FASTCALL_METHOD(pop_fresh,
                    "pop_fresh(max_delay, timeout=None) -> Record | None\n\nThe next record whose delay "
                    "(version - record.version) is < max_delay (>= 1). Stale records met on the way go back to "
                    "the pool and count as discarded. None on timeout; QueueClosed once closed and empty."),
    FASTCALL_METHOD(pop_many,
                    "pop_many(max_n, timeout=None) -> list[Record]\n\nWaits up to `timeout` seconds for one "
                    "record, then takes up to max_n in total without waiting. [] on timeout; QueueClosed once "
                    "closed and empty."),
    FASTCALL_METHOD(pop_into,
                    "pop_into(out, timeout=None) -> int\n\npop_many(len(out), timeout) without Python objects: "
                    "writes record i as out[i] = (slot, worker, version) and returns how many it wrote; rows "
                    "past that are left untouched. `out`: a writable C-contiguous buffer of native int64 or "
                    "uint64, shape (n, 3), e.g. numpy.empty((256, 3), numpy.uint64) or a torch int64 tensor's "
                    ".numpy(). An int64 buffer holds versions >= 2**63 as negative numbers (view it as uint64 "
                    "to read them). 0 on timeout; QueueClosed once closed and empty."),
    NOARGS_METHOD(bump_version, "bump_version() -> int\n\nIncrements the model version; returns the new one."),
    FASTCALL_METHOD(set_version, "set_version(version) -> None"),
    NOARGS_METHOD(close,
                  "close() -> None\n\nProducers raise QueueClosed from now on; consumers drain, then raise it. "
                  "Wakes every waiter. Idempotent."),
    NOARGS_METHOD(stats,
                  "stats() -> dict\n\n{pushed, popped, discarded, queued, free_slots, version, per_worker: "
                  "[{pushed, popped, discarded}, ...]}. A snapshot, exact when no thread is pushing or popping "
                  "(then pushed == popped + discarded + queued)."),
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef queue_getset[] = {
    {"version", get_version, nullptr, "The current model version.", nullptr},
    {"closed", get_closed, nullptr, "Whether close() was called.", nullptr},
    {"capacity", get_capacity, nullptr, "Ring size in records.", nullptr},
    {"num_slots", get_num_slots, nullptr, "Slots in the pool.", nullptr},
    {"num_workers", get_num_workers, nullptr, "Valid worker ids are 0..num_workers-1.", nullptr},
    {"free_slots", get_free_slots, nullptr, "Slots in the pool right now (a snapshot).", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

const char queue_doc[] =
    "GradientQueue(capacity, num_slots, num_workers)\n\n"
    "Bounded multi-producer multi-consumer queue of gradient records plus a pool of slot\n"
    "indices and an atomic model-version counter.\n\n"
    "capacity: ring size in records, a power of two. num_slots: slots 0..num_slots-1 in the\n"
    "gradient pool. num_workers: producers are worker ids 0..num_workers-1.\n\n"
    "Workers: slot = q.acquire_slot(); fill it; q.push(slot, worker, version).\n"
    "Server: rec = q.pop_fresh(max_delay) (or pop / pop_many); read rec.slot; q.release_slot(rec.slot).\n"
    "Batched drain without Python objects: n = q.pop_into(buf) with buf = numpy.empty((256, 3), numpy.uint64).\n"
    "Waits release the GIL. After close(), producers raise QueueClosed; consumers drain what\n"
    "is left, then raise QueueClosed. len(q) is the number of records queued (a snapshot).";

PyType_Slot queue_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(queue_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(queue_dealloc)},
    {Py_tp_repr, reinterpret_cast<void*>(queue_repr)},
    {Py_tp_methods, queue_methods},
    {Py_tp_getset, queue_getset},
    {Py_tp_doc, const_cast<char*>(queue_doc)},
    {Py_sq_length, reinterpret_cast<void*>(queue_len)},
    {0, nullptr},
};

PyType_Spec queue_spec = {"ringmaster_kernels.queue.GradientQueue", sizeof(QueueObject), 0, Py_TPFLAGS_DEFAULT,
                          queue_slots};

}  // namespace

PYBIND11_MODULE(_queue, m) {
  m.doc() = "C++ versioned gradient queue (documented in ringmaster_kernels.queue).";

  py::object record = py::module_::import("collections")
                          .attr("namedtuple")("Record", py::make_tuple("slot", "worker", "version"),
                                              py::arg("module") = "ringmaster_kernels.queue");
  record.attr("__doc__") =
      "Record(slot, worker, version): one gradient announcement (a namedtuple of ints). slot: index "
      "of the gradient's slot in the pool; worker: id of the worker that computed it; version: the "
      "model version it was computed at.";
  record_type = reinterpret_cast<PyTypeObject*>(record.ptr());
  m.add_object("Record", record);  // the module keeps record_type alive

  queue_closed_type =
      py::register_exception<ringmaster::QueueClosed>(m, "QueueClosed", PyExc_RuntimeError).ptr();

  PyObject* queue_type = PyType_FromSpec(&queue_spec);
  if (queue_type == nullptr) throw py::error_already_set();
  m.add_object("GradientQueue", py::reinterpret_steal<py::object>(queue_type));

  m.def(
      "stress",
      [](py::handle producers, py::handle records_per_producer, py::handle consumers, py::handle capacity,
         py::handle num_slots, py::handle batch, py::handle max_delay) {
        ringmaster::StressConfig cfg;
        cfg.producers = static_cast<std::uint32_t>(as_uint(producers.ptr(), "producers", 1024));
        cfg.records_per_producer = as_uint(records_per_producer.ptr(), "records_per_producer", std::uint64_t{1} << 32);
        cfg.consumers = static_cast<std::uint32_t>(as_uint(consumers.ptr(), "consumers", 1024));
        cfg.capacity = as_uint(capacity.ptr(), "capacity", GradientQueue::kMaxCapacity);
        cfg.num_slots = static_cast<std::uint32_t>(as_uint(num_slots.ptr(), "num_slots", GradientQueue::kMaxSlots));
        cfg.batch = as_uint(batch.ptr(), "batch", kMaxBatch);
        cfg.max_delay = as_uint(max_delay.ptr(), "max_delay", kU64Max);
        const ringmaster::StressResult r = without_gil([&] { return ringmaster::run_stress(cfg); });
        py::dict d;
        d["ok"] = r.ok();
        d["expected"] = r.expected;
        d["received"] = r.received;
        d["discarded"] = r.discarded;
        d["lost"] = r.lost;
        d["duplicated"] = r.duplicated;
        d["out_of_order"] = r.out_of_order;
        d["stale_returned"] = r.stale_returned;
        d["stats_consistent"] = r.stats_consistent;
        d["seconds"] = r.seconds;
        d["error"] = r.error;
        return d;
      },
      py::arg("producers") = 8, py::arg("records_per_producer") = 1000000, py::arg("consumers") = 1,
      py::arg("capacity") = 1024, py::arg("num_slots") = 512, py::arg("batch") = 1, py::arg("max_delay") = 0,
      "stress(producers=8, records_per_producer=1_000_000, consumers=1, capacity=1024, num_slots=512, "
      "batch=1, max_delay=0) -> dict\n\nC++ threads push through one GradientQueue (acquire_slot, push; pop, "
      "release_slot) and check every record. Returns ok, expected, received, discarded, lost, duplicated, "
      "out_of_order, stale_returned, stats_consistent, seconds, error. batch > 1: consumers use pop_many; "
      "max_delay > 0: one consumer uses pop_fresh while bumping the version every 4 records.");

  m.def(
      "wakeup_latencies_us",
      [](py::handle samples, double idle_s) {
        const auto n = static_cast<std::uint32_t>(as_positive(samples.ptr(), "samples", 1000000));
        if (!(idle_s >= 0.0 && idle_s <= 1.0)) throw py::value_error("idle_s: must be in [0, 1]");
        return without_gil([&] { return ringmaster::wakeup_latencies_us(n, idle_s); });
      },
      py::arg("samples") = 200, py::arg("idle_s") = 0.002,
      "wakeup_latencies_us(samples=200, idle_s=0.002) -> list[float]\n\nMicroseconds from a push to a C++ "
      "consumer that slept in pop() holding the record, one per sample; the producer waits idle_s before "
      "each push so the consumer is past its spin.");
}
