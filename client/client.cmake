# libdsclient: the C client library (ds_client.h), static + shared, with a pkg-config file.
# Built from client/client*.c; links the wire code (ds_proto) into itself so programs need
# only -ldsclient (plus libzmq and protobuf-c, named in the .pc file).
file(GLOB DS_CLIENT_LIB_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/client*.c)
get_target_property(DS_PROTO_SOURCES ds_proto SOURCES)
set(DS_CLIENT_ALL ${DS_CLIENT_LIB_SOURCES} ${PROJECT_BINARY_DIR}/proto/dsd.pb-c.c
    ${PROJECT_SOURCE_DIR}/proto/ds_wire.c ${PROJECT_SOURCE_DIR}/common/ds_err.c)
set_source_files_properties(${PROJECT_BINARY_DIR}/proto/dsd.pb-c.c PROPERTIES GENERATED TRUE
    COMPILE_OPTIONS "-Wno-missing-prototypes;-Wno-strict-prototypes;-Wno-shadow")
foreach(kind static shared)
    if(kind STREQUAL "static")
        add_library(dsclient_${kind} STATIC ${DS_CLIENT_ALL})
    else()
        add_library(dsclient_${kind} SHARED ${DS_CLIENT_ALL})
        set_target_properties(dsclient_${kind} PROPERTIES VERSION ${PROJECT_VERSION} SOVERSION 0)
    endif()
    set_target_properties(dsclient_${kind} PROPERTIES OUTPUT_NAME dsclient)
    add_dependencies(dsclient_${kind} ds_proto)
    target_include_directories(dsclient_${kind} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}
        PRIVATE ${PROJECT_BINARY_DIR}/proto ${PROJECT_SOURCE_DIR}/proto ${PROJECT_SOURCE_DIR}/common)
    target_link_libraries(dsclient_${kind} PUBLIC PkgConfig::ZMQ PkgConfig::PROTOBUFC Threads::Threads)
endforeach()
target_link_libraries(dsctl PRIVATE dsclient_static PkgConfig::JANSSON)
file(CONFIGURE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/dsclient.pc.in @ONLY CONTENT [=[
prefix=%PREFIX%
libdir=${prefix}/@CMAKE_INSTALL_LIBDIR@
includedir=${prefix}/@CMAKE_INSTALL_INCLUDEDIR@

Name: dsclient
Description: client library for the dsd inference cluster (submit jobs, stream tokens)
Version: @PROJECT_VERSION@
Requires.private: libzmq libprotobuf-c
Libs: -L${libdir} -ldsclient
Libs.private: -lpthread
Cflags: -I${includedir}
]=])
install(TARGETS dsclient_static dsclient_shared
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/ds_client.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# prefix= is written at install time, from the prefix being installed to: the .deb's prefix
# (/usr, chosen by CPack) is not the configure-time CMAKE_INSTALL_PREFIX (/usr/local).
install(CODE "
    file(READ \"${CMAKE_CURRENT_BINARY_DIR}/dsclient.pc.in\" _pc)
    string(REPLACE \"%PREFIX%\" \"\${CMAKE_INSTALL_PREFIX}\" _pc \"\${_pc}\")
    file(WRITE \"${CMAKE_CURRENT_BINARY_DIR}/pc-staged/dsclient.pc\" \"\${_pc}\")
    file(INSTALL \"${CMAKE_CURRENT_BINARY_DIR}/pc-staged/dsclient.pc\"
         DESTINATION \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}/pkgconfig\")")
# examples/dsclient_example.c: the whole client cycle in under a page (built against the
# static library here; installed users build it with pkg-config).
add_executable(dsclient_example ${PROJECT_SOURCE_DIR}/examples/dsclient_example.c)
target_link_libraries(dsclient_example PRIVATE dsclient_static)
