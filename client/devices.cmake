# dsctl devices (client/dsctl_devices.c) needs the devices library.
target_link_libraries(dsctl PRIVATE ds_devices)
