# Install rules for the systemd integration and the .deb (CPack). Included from the top-level
# CMakeLists.txt after the subdirectories (one line: include(cmake/packaging.cmake)).
#   cmake --install build --prefix /usr     binaries, unit, sysusers/tmpfiles, config, header,
#                                           library, pkg-config file, dsctl bash completion
#   cpack --config build/CPackConfig.cmake -G DEB
include(GNUInstallDirs)
set(DS_SYSTEMD_UNITDIR "lib/systemd/system" CACHE STRING "systemd unit directory (relative to prefix)")
install(FILES ${PROJECT_SOURCE_DIR}/systemd/dsd.service DESTINATION ${DS_SYSTEMD_UNITDIR})
install(FILES ${PROJECT_SOURCE_DIR}/systemd/dsd.sysusers DESTINATION lib/sysusers.d RENAME dsd.conf)
install(FILES ${PROJECT_SOURCE_DIR}/systemd/dsd.tmpfiles DESTINATION lib/tmpfiles.d RENAME dsd.conf)
# the example configuration: /etc/dsd/dsd.conf whatever the prefix (the unit reads it there;
# a conffile in the .deb)
set(DS_CONFDIR "/etc/dsd" CACHE PATH "where dsd.conf is installed")
install(FILES ${PROJECT_SOURCE_DIR}/systemd/dsd.conf DESTINATION ${DS_CONFDIR})
# bash completion for dsctl (bash-completion loads completions/<command> on first use)
install(FILES ${PROJECT_SOURCE_DIR}/client/dsctl.bash-completion
        DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions RENAME dsctl)
install(FILES ${PROJECT_SOURCE_DIR}/docs/operations.md ${PROJECT_SOURCE_DIR}/docs/daemon.md
              ${PROJECT_SOURCE_DIR}/docs/client.md DESTINATION ${CMAKE_INSTALL_DOCDIR} OPTIONAL)

set(CPACK_PACKAGE_NAME "dsd")
set(CPACK_PACKAGE_VENDOR "dsd project")
set(CPACK_PACKAGE_CONTACT "dsd maintainers <dsd@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "heterogeneous compute scheduler for DeepSeek-V3-family MoE models")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_GENERATOR "DEB")
set(CPACK_PACKAGING_INSTALL_PREFIX "/usr")
# with CPACK_SET_DESTDIR the staging install uses CPACK_INSTALL_PREFIX, not the prefix above:
# without it the .deb would carry the build's CMAKE_INSTALL_PREFIX (/usr/local by default),
# where the unit's /usr/sbin/dsd and the sysusers/tmpfiles directories are not.
set(CPACK_INSTALL_PREFIX "/usr")
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION "science")
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "systemd")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${PROJECT_SOURCE_DIR}/systemd/deb/postinst ${PROJECT_SOURCE_DIR}/systemd/deb/prerm
    ${PROJECT_SOURCE_DIR}/systemd/deb/postrm ${PROJECT_SOURCE_DIR}/systemd/deb/conffiles)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(CPACK_SET_DESTDIR ON) # absolute destinations (/etc/dsd) land in the package, not the host
include(CPack)
