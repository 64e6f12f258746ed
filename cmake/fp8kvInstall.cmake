# fp8kv as a dependency of other C++ projects: the version header, a shared library next to the
# static one, install rules, the CMake package (find_package(fp8kv CONFIG)) and the Debian package
# (cpack -G DEB). Included at the end of CMakeLists.txt, once every target is defined.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# ---- version -------------------------------------------------------------------------------
# One number, project(VERSION) in CMakeLists.txt: fp8kv::version(), `fp8kv --version`, the
# package config version file and the Debian package.
configure_file(${PROJECT_SOURCE_DIR}/cmake/version.h.in
               ${PROJECT_BINARY_DIR}/include/fp8kv/version.h @ONLY)
target_include_directories(fp8kv_lib PUBLIC $<BUILD_INTERFACE:${PROJECT_BINARY_DIR}/include>
                                            $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)

# ---- visibility ----------------------------------------------------------------------------
# Only what include/fp8kv marks FP8KV_API (fp8kv/export.h) is exported by the shared library.
# The static library's objects are the shared library's objects, so they are compiled as
# position-independent code with the same hidden default.
set_target_properties(fp8kv_lib PROPERTIES
    EXPORT_NAME fp8kv
    POSITION_INDEPENDENT_CODE ON
    CXX_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)

# ---- shared library ------------------------------------------------------------------------
# fp8kv::fp8kv_shared, libfp8kv.so.MAJOR.MINOR (the ABI may change with every minor version
# before 1.0), linked from fp8kv_lib's objects: nothing is compiled twice. Its dependencies are
# private; a consumer needs the headers and the definitions that tell them what was built.
add_library(fp8kv_shared SHARED $<TARGET_OBJECTS:fp8kv_lib>)
set_target_properties(fp8kv_shared PROPERTIES
    OUTPUT_NAME fp8kv
    EXPORT_NAME fp8kv_shared
    VERSION ${PROJECT_VERSION}
    SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
    INSTALL_RPATH_USE_LINK_PATH ON)
get_target_property(_fp8kv_deps fp8kv_lib LINK_LIBRARIES)
get_target_property(_fp8kv_defs fp8kv_lib INTERFACE_COMPILE_DEFINITIONS)
target_link_libraries(fp8kv_shared PRIVATE ${_fp8kv_deps})
target_compile_definitions(fp8kv_shared INTERFACE ${_fp8kv_defs})
target_include_directories(fp8kv_shared INTERFACE
    $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
    $<BUILD_INTERFACE:${PROJECT_BINARY_DIR}/include>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
# Static archives linked in (the CUDA runtime) keep their symbols to themselves.
target_link_options(fp8kv_shared PRIVATE "LINKER:--exclude-libs,ALL")
if(NOT FP8KV_SANITIZE)
  # Every symbol resolved at link time: a missing dependency fails here, not in a consumer.
  target_link_options(fp8kv_shared PRIVATE "LINKER:--no-undefined")
endif()
set_target_properties(fp8kv PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON)

# ---- install -------------------------------------------------------------------------------
install(TARGETS fp8kv_lib fp8kv_shared EXPORT fp8kvTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS fp8kv RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# Every public header, whatever its name (read at install time, so new headers need no edit).
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/fp8kv ${PROJECT_BINARY_DIR}/include/fp8kv
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.h")

set(FP8KV_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/fp8kv)
install(EXPORT fp8kvTargets NAMESPACE fp8kv:: DESTINATION ${FP8KV_CMAKE_DIR})
# What the config must find again for the targets' link interfaces: what this build had.
set(FP8KV_CONFIG_BLAS ${BLAS_FOUND})
set(FP8KV_CONFIG_CUDA ${FP8KV_WITH_CUDA})
if(TARGET fp8kv::nccl)
  set(FP8KV_CONFIG_NCCL ON)
else()
  set(FP8KV_CONFIG_NCCL OFF)
endif()
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/fp8kvConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/fp8kvConfig.cmake
                              INSTALL_DESTINATION ${FP8KV_CMAKE_DIR})
# Before 1.0 a minor version may break the API: 0.9.x satisfies a request for 0.9, not 0.8.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/fp8kvConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/fp8kvConfig.cmake ${PROJECT_BINARY_DIR}/fp8kvConfigVersion.cmake
        DESTINATION ${FP8KV_CMAKE_DIR})
install(FILES ${PROJECT_SOURCE_DIR}/README.md ${PROJECT_SOURCE_DIR}/CHANGELOG.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR})

# ---- test: install, then build and run examples/cpp against the installed package ----------
if(FP8KV_TESTS)
  set(_fp8kv_consumer_flags "")
  if(FP8KV_SANITIZE)
    # The static library's objects call into the sanitizer runtimes.
    set(_fp8kv_consumer_flags "-fsanitize=address,undefined")
  endif()
  add_test(NAME install.consumer_example
           COMMAND ${PROJECT_SOURCE_DIR}/tests/install/consumer_test.sh
                   ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR} ${CMAKE_CXX_COMPILER}
                   "${_fp8kv_consumer_flags}")
  set_tests_properties(install.consumer_example PROPERTIES TIMEOUT 300 LABELS install)
endif()

# ---- Debian package: cpack -G DEB in the build directory -----------------------------------
set(CPACK_PACKAGE_NAME fp8kv)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_VENDOR "fp8kv")
set(CPACK_PACKAGE_CONTACT "fp8kv maintainers <fp8kv@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "FP8 (E4M3) KV cache with calibrated scales: library, headers, CMake package, command")
set(CPACK_PACKAGE_INSTALL_DIRECTORY /usr)
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION science)
# Runtime dependencies from the binaries (dpkg-shlibdeps): libc6, libstdc++6, libgcc-s1,
# libgomp1 and the OpenBLAS runtime.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
if(FP8KV_WITH_CUDA)
  # The CUDA libraries come from the NVIDIA toolkit, not from a Debian package.
  set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS ${CUDAToolkit_LIBRARY_DIR})
endif()
# The CMake package links the static library against BLAS::BLAS, which FindBLAS finds through
# the development package.
if(BLAS_FOUND)
  set(CPACK_DEBIAN_PACKAGE_DEPENDS "libopenblas-dev")
endif()
include(CPack)
