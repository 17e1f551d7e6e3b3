/*
 * refimpl test shim: make any ggml program see a ggml RPC server as one of its devices.
 *
 *   LD_PRELOAD=/path/rpc_preload.so REFIMPL_RPC_ENDPOINT=127.0.0.1:50052 test-backend-ops -b RPC0
 *
 * At load time it asks llama.cpp's RPC backend for the server's devices (this connects and
 * runs HELLO and DEVICE_COUNT) and registers them with ggml's backend registry, as if the
 * program had been given --rpc.  Built from this file at test time; part of refimpl.
 */
#include <stdio.h>
#include <stdlib.h>

typedef void * ggml_backend_reg_t;
ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
void ggml_backend_register(ggml_backend_reg_t reg);

__attribute__((constructor)) static void refimpl_register_rpc_server(void) {
    const char * endpoint = getenv("REFIMPL_RPC_ENDPOINT");
    if (endpoint == NULL || endpoint[0] == '\0') {
        return;
    }
    ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);
    if (reg == NULL) {
        fprintf(stderr, "rpc_preload: no devices at %s\n", endpoint);
        return;
    }
    ggml_backend_register(reg);
}
