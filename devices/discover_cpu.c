/* discover_cpu.c — CPU devices from hwloc: one per NUMA node (per package where a topology has
 * no NUMA node), with its cores, PUs, caches, memory and the ISA features our kernels use.
 *
 * The topology is this machine's, or an XML file / synthetic description (tests of multi-socket
 * machines that are not here). ISA flags and free memory are read only for this machine. */
#include <hwloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "devices_impl.h"
#include "ds_cleanup.h"

static uint64_t cache_size(hwloc_topology_t t, hwloc_const_cpuset_t set, hwloc_obj_type_t type)
{
    hwloc_obj_t c = hwloc_get_obj_inside_cpuset_by_type(t, set, type, 0);
    if (!c) { /* one cache above the whole domain */
        hwloc_obj_t pu = hwloc_get_obj_inside_cpuset_by_type(t, set, HWLOC_OBJ_PU, 0);
        c = pu ? hwloc_get_ancestor_obj_by_type(t, type, pu) : NULL;
    }
    return c && c->attr ? c->attr->cache.size : 0;
}

/* Flags from /proc/cpuinfo: the kernel's view of what the CPU and OS both enable. */
static uint32_t read_isa(void)
{
    _cleanup_fclose_ FILE *f = fopen("/proc/cpuinfo", "re");
    if (!f)
        return 0;
    char line[8192];
    uint32_t isa = 0;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "flags", 5) && strncmp(line, "Features", 8))
            continue;
        char *save = NULL;
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        for (char *t = strtok_r(colon + 1, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
            if (!strcmp(t, "avx2"))
                isa |= DS_ISA_AVX2;
            else if (!strcmp(t, "fma"))
                isa |= DS_ISA_FMA;
            else if (!strcmp(t, "avx512f"))
                isa |= DS_ISA_AVX512F;
            else if (!strcmp(t, "avx512_bf16"))
                isa |= DS_ISA_AVX512_BF16;
            else if (!strcmp(t, "amx_tile"))
                isa |= DS_ISA_AMX;
            else if (!strcmp(t, "asimd"))
                isa |= DS_ISA_NEON;
            else if (!strcmp(t, "sve"))
                isa |= DS_ISA_SVE;
        }
        break;
    }
    return isa;
}

/* MemFree of one NUMA node from sysfs, 0 when unknown. */
static uint64_t numa_free_bytes(unsigned os_index)
{
    char path[96];
    snprintf(path, sizeof(path), "/sys/devices/system/node/node%u/meminfo", os_index);
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    char line[256];
    while (fgets(line, sizeof(line), f)) {
        unsigned node;
        unsigned long long kb;
        if (sscanf(line, "Node %u MemFree: %llu kB", &node, &kb) == 2)
            return (uint64_t)kb * 1024;
    }
    return 0;
}

static int add_domain(ds_device_list *l, hwloc_topology_t t, hwloc_obj_t dom, uint64_t mem,
                      bool here, uint32_t isa, ds_error *err)
{
    ds_device_info *d;
    int r = ds_devices_append(l, "cpu", &d, err);
    if (r < 0)
        return r;
    hwloc_const_cpuset_t set = dom->cpuset;
    snprintf(d->source, sizeof(d->source), "cpu");
    d->kind = DS_DEVICE_KIND_CPU;
    d->cores = (uint32_t)hwloc_get_nbobjs_inside_cpuset_by_type(t, set, HWLOC_OBJ_CORE);
    d->pus = (uint32_t)hwloc_get_nbobjs_inside_cpuset_by_type(t, set, HWLOC_OBJ_PU);
    if (d->cores == 0)
        d->cores = d->pus;
    d->compute_units = d->cores;
    d->memory_bytes = mem;
    d->l2_bytes = cache_size(t, set, HWLOC_OBJ_L2CACHE);
    d->l3_bytes = cache_size(t, set, HWLOC_OBJ_L3CACHE);
    hwloc_obj_t pu = hwloc_get_obj_inside_cpuset_by_type(t, set, HWLOC_OBJ_PU, 0);
    hwloc_obj_t pkg = pu ? hwloc_get_ancestor_obj_by_type(t, HWLOC_OBJ_PACKAGE, pu) : NULL;
    if (dom->type == HWLOC_OBJ_PACKAGE)
        pkg = dom;
    d->package = pkg ? pkg->logical_index : 0;
    const char *model = pkg ? hwloc_obj_get_info_by_name(pkg, "CPUModel") : NULL;
    const char *vendor = pkg ? hwloc_obj_get_info_by_name(pkg, "CPUVendor") : NULL;
    ds_devices_copy_text(d->model, sizeof(d->model), model ? model : "cpu");
    ds_devices_copy_text(d->vendor, sizeof(d->vendor), vendor ? vendor : "");
    char *list = NULL;
    if (hwloc_bitmap_list_asprintf(&list, set) >= 0 && list) {
        if (strlen(list) < sizeof(d->cpuset))
            snprintf(d->cpuset, sizeof(d->cpuset), "%s", list);
        free(list);
    }
    if (dom->type == HWLOC_OBJ_NUMANODE)
        d->numa_node = (int)dom->os_index;
    if (here) {
        d->isa = isa;
        if (dom->type == HWLOC_OBJ_NUMANODE)
            d->memory_free_bytes = numa_free_bytes(dom->os_index);
    }
    snprintf(d->backend_spec, sizeof(d->backend_spec), "cpu");
    snprintf(d->class_name, sizeof(d->class_name), "server");
    return 0;
}

static int cpu_discover(ds_device_list *l, const ds_devices_options *opt, ds_error *err)
{
    hwloc_topology_t t;
    if (hwloc_topology_init(&t) < 0)
        return ds_error_set(err, -ENOMEM, "hwloc: topology init failed");
    int r = 0;
    if (opt->hwloc_xml && hwloc_topology_set_xml(t, opt->hwloc_xml) < 0)
        r = ds_error_set(err, -EINVAL, "%s: hwloc cannot read this XML topology", opt->hwloc_xml);
    else if (!opt->hwloc_xml && opt->hwloc_synthetic &&
             hwloc_topology_set_synthetic(t, opt->hwloc_synthetic) < 0)
        r = ds_error_set(err, -EINVAL, "hwloc: bad synthetic topology '%.100s'",
                         opt->hwloc_synthetic);
    if (r == 0 && hwloc_topology_load(t) < 0)
        r = ds_error_set(err, -EIO, "hwloc: loading the topology failed");
    if (r < 0) {
        hwloc_topology_destroy(t);
        return r;
    }
    bool here = hwloc_topology_is_thissystem(t);
    uint32_t isa = here ? read_isa() : 0;
    int nnuma = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
    if (nnuma > 0) {
        for (int i = 0; i < nnuma && r == 0; i++) {
            hwloc_obj_t n = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, (unsigned)i);
            if (!n->cpuset || hwloc_bitmap_iszero(n->cpuset))
                continue; /* memory-only node (CXL, HBM without cores): not a compute device */
            r = add_domain(l, t, n, n->attr ? n->attr->numanode.local_memory : 0, here, isa, err);
        }
    } else {
        int npkg = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PACKAGE);
        hwloc_obj_t root = hwloc_get_root_obj(t);
        uint64_t total = root->total_memory;
        if (npkg <= 0)
            r = add_domain(l, t, root, total, here, isa, err);
        for (int i = 0; i < npkg && r == 0; i++)
            r = add_domain(l, t, hwloc_get_obj_by_type(t, HWLOC_OBJ_PACKAGE, (unsigned)i),
                           total / (uint64_t)npkg, here, isa, err);
    }
    hwloc_topology_destroy(t);
    return r;
}

const ds_discovery_source ds_discovery_cpu = {
    .name = "cpu",
    .priority = 0,
    .enabled_default = true,
    .discover = cpu_discover,
};
