/* ds_module.c — compiled into every module library so a module folder always yields a
 * library, even while it is being built up. */
typedef int ds_module_nonempty;
