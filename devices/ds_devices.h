/* ds_devices.h — what compute devices a node has, and what they measurably do.
 *
 * Discovery sources are components in one registry (name, priority, enabled by default):
 *   cpu    via hwloc: one device per NUMA node (per package where there is no NUMA node);
 *   opencl via the ICD loader: every device of every platform, a CPU-type device (PoCL) marked
 *          as sharing silicon with the CPU device so placement never counts it twice;
 *   cuda   via the driver API loaded at run time (dlopen "libcuda.so.1"): no driver, no devices
 *          is a normal, empty result.
 * Operator configuration (docs/devices.md) then excludes devices, caps memory, and sets the node
 * and device classes and labels.
 *
 * Calibration runs short measurements on each device (weight-streaming matvec bandwidth, FLOP/s
 * for a batch of rows, host<->device copy bandwidth and launch latency for accelerators), each
 * the median of repeats with its spread, and caches them in the state directory keyed by a
 * hardware fingerprint. The node's devices are emitted as a cluster-spec node fragment
 * (docs/cluster-spec.md), which placement reads.
 *
 * Device names are stable within a node: cpu0.. in hwloc's NUMA order, opencl0.. in the order
 * of ds_backend_open("opencl:N") (all devices of all platforms), cuda0.. by CUDA ordinal. */
#ifndef DS_DEVICES_H
#define DS_DEVICES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_err.h"

#define DS_DEVICE_NAME_MAX  32
#define DS_DEVICE_CLASS_MAX 16
#define DS_DEVICE_TEXT_MAX  128
#define DS_DEVICES_MAX      256 /* devices per node: a limit on what a config or topology can make */

typedef enum ds_device_kind {
    DS_DEVICE_KIND_CPU = 0,
    DS_DEVICE_KIND_GPU = 1,
    DS_DEVICE_KIND_ACCEL = 2,
} ds_device_kind;

/* ISA features our CPU kernels care about (bit flags in ds_device_info.isa). */
enum {
    DS_ISA_AVX2 = 1u << 0,
    DS_ISA_AVX512F = 1u << 1,
    DS_ISA_AVX512_BF16 = 1u << 2,
    DS_ISA_AMX = 1u << 3,
    DS_ISA_NEON = 1u << 4,
    DS_ISA_SVE = 1u << 5,
    DS_ISA_FMA = 1u << 6,
};

/* One measured figure: the median over repeats and its spread. */
typedef struct ds_measure {
    double value;  /* median, in the unit of the field that holds it; 0 = not measured */
    double spread; /* (max - min) / median over the repeats, a fraction */
    uint32_t repeats;
} ds_measure;

/* One device: what discovery found, what configuration set, what calibration measured. */
typedef struct ds_device_info {
    char name[DS_DEVICE_NAME_MAX]; /* "cpu0", "opencl1", "cuda0" */
    char source[16];               /* discovery source: "cpu", "opencl", "cuda" */
    ds_device_kind kind;
    char class_name[DS_DEVICE_CLASS_MAX]; /* "server", "gpu", "edge" (config may override) */
    char model[DS_DEVICE_TEXT_MAX];       /* CPU model / OpenCL or CUDA device name */
    char vendor[64];
    char driver[64];                              /* driver / OpenCL version string; "" for cpu */
    char labels[DS_DEVICE_TEXT_MAX];              /* comma-separated operator labels */
    char shares_silicon_with[DS_DEVICE_NAME_MAX]; /* device on the same silicon, "" if none */
    char cpuset[64];               /* cpu: hwloc cpuset as a list ("0-15"); "" otherwise */
    char backend_spec[24];         /* what ds_backend_open takes: "opencl:1", "cuda:0" */
    int numa_node;                 /* OS NUMA index (cpu), NUMA affinity (gpu); -1 unknown */
    uint32_t package;              /* cpu: package (socket) index */
    uint32_t cores, pus;           /* cpu: physical cores and hardware threads */
    uint32_t compute_units;        /* cpu: cores; OpenCL: compute units; CUDA: SMs */
    uint32_t clock_mhz;            /* max clock, 0 if unknown */
    uint32_t isa;                  /* DS_ISA_* bits (cpu) */
    uint64_t l2_bytes, l3_bytes;   /* cpu: per core L2, L3 of the domain; 0 if unknown */
    uint64_t memory_bytes;         /* usable memory after the operator's cap */
    uint64_t memory_found_bytes;   /* what discovery found before the cap */
    uint64_t memory_free_bytes;    /* free at discovery, 0 if unknown */
    uint64_t max_alloc_bytes;      /* OpenCL max single allocation, 0 otherwise */
    uint64_t local_mem_bytes;      /* OpenCL local / CUDA shared memory per group */
    uint32_t cc_major, cc_minor;   /* CUDA compute capability */
    char pci_bus[20];              /* CUDA: "0000:65:00.0" */
    uint32_t pcie_gen, pcie_width; /* CUDA: current PCIe link, 0 if unknown */
    bool fp16, fp64;               /* OpenCL: extensions present */
    bool unified_memory;           /* memory shared with the host (integrated GPU, PoCL) */
    bool excluded;                 /* by configuration: listed, never placed, not measured */
    /* calibration (all 0 until ds_device_list_calibrate) */
    bool calibrated, from_cache;
    ds_measure mem_bw;      /* bytes/s a matvec streams weights at (bounds decode) */
    ds_measure flops;       /* FLOP/s of a matmul over a batch of rows */
    ds_measure stream_copy; /* cpu: STREAM-style copy, bytes/s (read + write), same process */
    ds_measure host_link;   /* accelerators: host->device copy, bytes/s */
    ds_measure launch;      /* accelerators: seconds from enqueue of a tiny op to its end */
} ds_device_info;

typedef struct ds_device_list ds_device_list;

typedef struct ds_devices_options {
    const char *hwloc_xml;       /* topology from an XML file instead of this machine */
    const char *hwloc_synthetic; /* or a synthetic description ("pack:2 numa:2 core:4 pu:1") */
    const char *cuda_library;    /* NULL: "libcuda.so.1" (tests point it at a missing file) */
    const char *config_path;     /* operator configuration file, NULL for none */
    const char *config_text;     /* or its text (used when config_path is NULL) */
    bool no_opencl, no_cuda;     /* skip those sources (components disabled) */
} ds_devices_options;

/* Discovers this node's devices and applies the configuration. Absent OpenCL/CUDA are empty
 * results. Caller owns *ret (ds_device_list_free). Errors: hwloc failure, bad config (-EINVAL
 * with err naming the file, line and key). */
int ds_device_list_discover(const ds_devices_options *opt, ds_device_list **ret, ds_error *err);
ds_device_list *ds_device_list_free(ds_device_list *l);

size_t ds_device_list_count(const ds_device_list *l);
/* Device i (< count); the list keeps ownership. NULL past the end. */
const ds_device_info *ds_device_list_get(const ds_device_list *l, size_t i);
/* By name, NULL if absent. */
const ds_device_info *ds_device_list_find(const ds_device_list *l, const char *name);
/* The node's name (config node.name, else the host name) and class (config, else derived:
 * "gpu" with a non-excluded GPU, else "server"). */
const char *ds_device_list_node_name(const ds_device_list *l);
const char *ds_device_list_node_class(const ds_device_list *l);
/* A hash of what the hardware is (models, memory, cores, driver versions) as 16 hex digits. */
const char *ds_device_list_fingerprint(const ds_device_list *l);

typedef struct ds_calibrate_options {
    const char *state_dir;        /* cache directory; NULL: no cache */
    bool force;                   /* re-measure even on a cache hit (dsctl devices --calibrate) */
    uint64_t matvec_bytes;        /* weight bytes one matvec streams; 0: 128 MiB */
    uint32_t repeats;             /* per figure; 0: 5 */
    const char *fingerprint_salt; /* mixed into the fingerprint (tests, calibration changes) */
} ds_calibrate_options;

/* Measures every non-excluded device (or loads the cache when its fingerprint matches and
 * force is false) and, when state_dir is set, writes the cache. A corrupt cache is reported
 * with a warning and re-measured. Returns the number of devices measured now (0 on a cache
 * hit) or a negative errno. */
int ds_device_list_calibrate(ds_device_list *l, const ds_calibrate_options *opt, ds_error *err);

/* The node as a cluster-spec node object {name, class, devices: [...]} with the keys of
 * docs/cluster-spec.md (excluded devices left out). Caller frees *json with free(). */
int ds_device_list_spec_json(const ds_device_list *l, char **json, ds_error *err);
/* Everything discovered and measured, for `dsctl devices --json`: {"node": <spec node>,
 * "fingerprint": "...", "discovered": [...full records...]}. Caller frees *json. */
int ds_device_list_report_json(const ds_device_list *l, char **json, ds_error *err);

const char *ds_device_kind_name(ds_device_kind k);
/* Parses "8GiB", "512M", "1e9", "123" into bytes (binary suffixes K/M/G/T with optional iB
 * or B; decimal kB/MB/GB/TB). -EINVAL / -ERANGE. */
int ds_devices_parse_bytes(const char *s, uint64_t *ret);

/* Operator configuration alone, for fuzzing and dsctl --check: validates text (key = value
 * lines, docs/devices.md). */
int ds_devices_config_check(const char *text, size_t len, ds_error *err);
/* Calibration cache text alone, for fuzzing: 0 when it parses and matches fingerprint. */
int ds_devices_cache_check(const char *text, size_t len, const char *fingerprint, ds_error *err);

#endif
