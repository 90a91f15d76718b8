# dsctl generate (client/dsctl_generate.c) runs the engine in-process.
target_link_libraries(dsctl PRIVATE ds_experts ds_model)
