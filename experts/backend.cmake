# Routed experts on a compute backend (experts/backend_moe.c, docs/backends.md) need the
# backend interface of devices/. Included from experts/CMakeLists.txt (and, until that line
# is there, from tests/backends.cmake: CMake allows linking a target of another directory).
include_guard(GLOBAL)
target_link_libraries(ds_experts PUBLIC ds_devices)
