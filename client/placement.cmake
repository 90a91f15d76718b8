# dsctl plan (client/dsctl_plan.c) runs the placement solver in-process.
target_link_libraries(dsctl PRIVATE ds_placement)
