/*
 * refimpl test launcher: serve ggml's own RPC server (the library's ggml_backend_rpc_start_server)
 * on the CPU device, for ggml builds that no llama-cpp-python release vendors, so that no
 * llama.cpp rpc-server program exists for them (spec/versions.md, protocols 3.0.0 to 5.1.0 read
 * from the ggml repository's history).  All protocol handling is the library's; this file only
 * does what llama.cpp's rpc-server main does before handing over: pick the device and say
 * where to listen.
 *
 *   cc -o ggml-rpc-server ggml_rpc_launcher.c -I$GGML/include -L$BUILD/bin -lggml -lggml-base
 *      -lggml-rpc [-DREFIMPL_START_SERVER_WITH_MEMORY]   # 3.0.0's signature passes the memory
 *   ggml-rpc-server [-H HOST] [-p PORT] [-t THREADS]     # llama.cpp rpc-server's flags
 *
 * Part of refimpl's test tooling; built at test time (tools/ggml_history_peers.py).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml-rpc.h"

int main(int argc, char ** argv) {
    const char * host = "127.0.0.1";
    const char * port = "50052";
    size_t n_threads = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "-H") == 0) {
            host = argv[i + 1];
        } else if (strcmp(argv[i], "-p") == 0) {
            port = argv[i + 1];
        } else if (strcmp(argv[i], "-t") == 0) {
            n_threads = (size_t) atoi(argv[i + 1]);
        } else {
            fprintf(stderr, "usage: %s [-H HOST] [-p PORT] [-t THREADS]\n", argv[0]);
            return 2;
        }
    }
    char endpoint[256];
    snprintf(endpoint, sizeof(endpoint), "%s:%s", host, port);
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (dev == NULL) {
        fprintf(stderr, "no CPU device\n");
        return 1;
    }
    fprintf(stderr, "serving %s on %s\n", ggml_backend_dev_name(dev), endpoint);
    fflush(stderr);
#ifdef REFIMPL_START_SERVER_WITH_MEMORY
    size_t free_mem = 0, total_mem = 0;
    ggml_backend_dev_memory(dev, &free_mem, &total_mem);
    ggml_backend_rpc_start_server(endpoint, NULL, n_threads, 1, &dev, &free_mem, &total_mem);
#else
    ggml_backend_rpc_start_server(endpoint, NULL, n_threads, 1, &dev);
#endif
    return 0;
}
