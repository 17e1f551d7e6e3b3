/* Preload shim for llama.cpp's tools in the tests: drain their log at exit.
 *
 * llama.cpp's common library logs through a background thread and does not drain it when the
 * program ends (upstream issue ggml-org/llama.cpp#22142), so on a loaded machine a tool that
 * exits with status 0 can lose its last lines: generated text, the final perplexity.  This
 * shim registers an exit handler that asks the logger to stop, which writes out everything
 * queued first.  The symbols are looked up at run time, so the shim does nothing in programs
 * without llama.cpp's common library.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

typedef void *(*log_main_fn)(void);
typedef void (*log_pause_fn)(void *);

static void drain_llama_log(void) {
    log_main_fn log_main = (log_main_fn)dlsym(RTLD_DEFAULT, "_Z15common_log_mainv");
    log_pause_fn log_pause = (log_pause_fn)dlsym(RTLD_DEFAULT, "_Z16common_log_pauseP10common_log");
    if (log_main && log_pause) {
        log_pause(log_main());
    }
}

__attribute__((constructor)) static void register_drain(void) {
    atexit(drain_llama_log);
}
