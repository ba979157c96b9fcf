/* The interactive prompt. GNU readline (callback interface) gives line editing, history saved
 * across sessions and tab completion; the loop follows lua.c: a line is first tried as
 * `return <line>` so expressions print without `=`, and input continues with `>> ` while the
 * chunk is incomplete (the parser stopped at <eof>). Ctrl-C clears the line at the prompt and
 * interrupts a running statement (host_docall); Ctrl-D on an empty prompt exits.
 * Without a terminal on stdin (`flowerlua -i < file`) lines are read plainly. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>

#include <readline/history.h>
#include <readline/readline.h>

#include <lua.h>
#include <lauxlib.h>

#include "host.h"

#define PROMPT  "> "
#define PROMPT2 ">> "
#define HISTORY_MAX 1000                /* entries kept in the history file */

static lua_State *repl_L;               /* for the readline callbacks */
static int helper_ref = LUA_NOREF;      /* registry ref of {format=, complete=} */
static int use_readline;
static char history_path[PATH_MAX];     /* "" if history is not saved */

/* ---- reading a line ---- */

static volatile sig_atomic_t got_sigint, got_sigwinch;
static char *line_read;
static int line_done;

static void prompt_sigint(int sig) { (void)sig; got_sigint = 1; }
static void prompt_sigwinch(int sig) { (void)sig; got_sigwinch = 1; }

static void line_handler(char *line) {
  line_read = line;
  line_done = 1;
  rl_callback_handler_remove();         /* no prompt is redrawn while the statement runs */
}

enum { READ_LINE, READ_EOF, READ_INTERRUPT };

/* Reads one line with readline's callback interface, so that Ctrl-C (which only sets a flag)
 * can abandon the line from the select loop, outside any readline code. */
static int read_readline(const char *prompt, char **out) {
  struct sigaction sa, old_int, old_winch;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = prompt_sigint;        /* no SA_RESTART: select returns EINTR */
  sigaction(SIGINT, &sa, &old_int);
  sa.sa_handler = prompt_sigwinch;
  sigaction(SIGWINCH, &sa, &old_winch);
  got_sigint = got_sigwinch = 0;
  line_read = NULL;
  line_done = 0;
  fflush(stdout);
  rl_callback_handler_install(prompt, line_handler);
  int result = READ_LINE;
  int fd = fileno(rl_instream ? rl_instream : stdin);
  while (!line_done) {
    fd_set fds;
    FD_ZERO(&fds);
    FD_SET(fd, &fds);
    int r = select(fd + 1, &fds, NULL, NULL, NULL);
    if (got_sigint) {                   /* drop the line, start a fresh prompt */
      FILE *o = rl_outstream ? rl_outstream : stdout;
      got_sigint = 0;
      rl_point = rl_end;                /* show "> text^C", then a fresh line */
      rl_redisplay();
      fputs("^C\n", o);
      fflush(o);
      rl_replace_line("", 0);
      rl_free_line_state();
      rl_callback_sigcleanup();
      rl_callback_handler_remove();     /* restores the terminal */
      result = READ_INTERRUPT;
      break;
    }
    if (got_sigwinch) { got_sigwinch = 0; rl_resize_terminal(); }
    if (r < 0) {
      if (errno == EINTR) continue;
      rl_callback_handler_remove();
      result = READ_EOF;
      break;
    }
    if (r > 0) rl_callback_read_char();
  }
  sigaction(SIGINT, &old_int, NULL);
  sigaction(SIGWINCH, &old_winch, NULL);
  if (result == READ_LINE && line_read == NULL) result = READ_EOF;
  *out = result == READ_LINE ? line_read : NULL;
  if (result != READ_LINE) free(line_read);
  return result;
}

/* Without a terminal: print the prompt, read with getline, drop the newline. */
static int read_plain(const char *prompt, char **out) {
  fputs(prompt, stdout);
  fflush(stdout);
  char *line = NULL;
  size_t cap = 0;
  got_sigint = 0;
  errno = 0;
  ssize_t n = getline(&line, &cap, stdin);
  if (n < 0) {
    free(line);
    *out = NULL;
    if (errno != EINTR || !got_sigint) return READ_EOF;
    clearerr(stdin);                    /* Ctrl-C: a new prompt */
    fputc('\n', stdout);
    return READ_INTERRUPT;
  }
  if (n > 0 && line[n - 1] == '\n') line[n - 1] = '\0';
  *out = line;
  return READ_LINE;
}

static int read_line(const char *prompt, char **out) {
  return use_readline ? read_readline(prompt, out) : read_plain(prompt, out);
}

/* ---- history ---- */

static void history_open(void) {
  const char *env = getenv("FLOWERLUA_HISTORY");
  const char *home = getenv("HOME");
  history_path[0] = '\0';
  if (env && *env) snprintf(history_path, sizeof history_path, "%s", env);
  else if (home && *home) snprintf(history_path, sizeof history_path, "%s/.flowerlua_history", home);
  if (!history_path[0]) return;
  using_history();
  if (read_history(history_path) != 0) {  /* missing: create it, so entries can be appended */
    int fd = open(history_path, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd < 0) history_path[0] = '\0'; else close(fd);
  }
}

/* Adds an entry (a whole multi-line chunk) and appends it to the file at once, so history
 * survives a crash or kill. Skips blank lines and repeats of the previous entry. */
static void history_add(const char *text) {
  if (!use_readline || text[strspn(text, " \t\n")] == '\0') return;
  HIST_ENTRY *last = history_length > 0 ? history_get(history_base + history_length - 1) : NULL;
  if (last && strcmp(last->line, text) == 0) return;
  add_history(text);
  if (history_path[0]) append_history(1, history_path);
}

static void history_close(void) {
  if (use_readline && history_path[0]) history_truncate_file(history_path, HISTORY_MAX);
  if (use_readline) clear_history();
}

/* ---- completion ---- */

static char **matches_list;             /* candidates of the current completion (malloc'd) */
static size_t matches_n, matches_next;

static char *match_generator(const char *text, int state) {
  (void)text;
  if (state == 0) matches_next = 0;
  return matches_next < matches_n ? strdup(matches_list[matches_next++]) : NULL;
}

static void matches_free(void) {
  for (size_t i = 0; i < matches_n; i++) free(matches_list[i]);
  free(matches_list);
  matches_list = NULL;
  matches_n = 0;
}

/* Completion must not hang the prompt on a pathological __index. */
static void completion_timeout(lua_State *L, lua_Debug *ar) {
  (void)ar;
  luaL_error(L, "completion took too long");
}

/* Asks the Lua helper for the words completing `text` ("flower.nn.Con", "t:si", "pri"). */
static void collect_matches(const char *text) {
  lua_State *L = repl_L;
  int top = lua_gettop(L);
  matches_free();
  lua_rawgeti(L, LUA_REGISTRYINDEX, helper_ref);
  if (!lua_istable(L, -1)) { lua_settop(L, top); return; }
  lua_getfield(L, -1, "complete");
  lua_pushglobaltable(L);
  lua_pushstring(L, text);
  lua_sethook(L, completion_timeout, LUA_MASKCOUNT, 10000000);
  int status = lua_pcall(L, 2, 1, 0);
  lua_sethook(L, NULL, 0, 0);
  if (status == LUA_OK && lua_istable(L, -1)) {
    size_t n = (size_t)lua_rawlen(L, -1);
    matches_list = n ? calloc(n, sizeof *matches_list) : NULL;
    for (size_t i = 0; matches_list && i < n; i++) {
      lua_rawgeti(L, -1, (lua_Integer)i + 1);
      const char *s = lua_tostring(L, -1);
      if (s && (matches_list[matches_n] = strdup(s)) != NULL) matches_n++;
      lua_pop(L, 1);
    }
  }
  lua_settop(L, top);
}

static char **attempt_completion(const char *text, int start, int end) {
  (void)start; (void)end;
  rl_attempted_completion_over = 1;     /* never fall back to file names */
  rl_completion_suppress_append = 1;    /* no space after `flower.zeros` */
  collect_matches(text);
  char **m = matches_n ? rl_completion_matches(text, match_generator) : NULL;
  matches_free();
  return m;
}

/* Lists candidates by their last component (`zeros  ones`, not `flower.zeros  flower.ones`). */
static void display_matches(char **matches, int n, int max_len) {
  (void)max_len;
  const char *first = matches[1] ? matches[1] : matches[0];
  size_t cut = 0;
  for (size_t i = 0; first[i]; i++)
    if (first[i] == '.' || first[i] == ':') cut = i + 1;
  char **shown = calloc((size_t)n + 2, sizeof *shown);
  if (!shown) return;
  int width = 0;
  shown[0] = matches[0];
  for (int i = 1; i <= n; i++) {
    shown[i] = strlen(matches[i]) >= cut ? matches[i] + cut : matches[i];
    int w = (int)strlen(shown[i]);
    if (w > width) width = w;
  }
  rl_display_match_list(shown, n, width);
  rl_forced_update_display();
  free(shown);
}

static void readline_setup(void) {
  rl_readline_name = "flowerlua";
  rl_catch_signals = 0;                 /* our handlers (read_readline) do it */
  rl_catch_sigwinch = 0;
  /* Word breaks exclude '.' and ':' so that `flower.nn.Con` is completed as one word. */
  rl_basic_word_break_characters = " \t\n\"\\'`@$><=;|&{(,+-*/%^~#[]";
  rl_completer_word_break_characters = rl_basic_word_break_characters;
  rl_attempted_completion_function = attempt_completion;
  rl_completion_display_matches_hook = display_matches;
  history_open();
}

/* ---- evaluating ---- */

/* 1 if the error message on top says the chunk ended early (more lines may complete it). */
static int incomplete(lua_State *L, int status) {
  static const char mark[] = "<eof>";
  size_t len;
  const char *msg = lua_tolstring(L, -1, &len);
  return status == LUA_ERRSYNTAX && msg && len >= sizeof mark - 1 &&
         strcmp(msg + len - (sizeof mark - 1), mark) == 0;
}

enum { CHUNK_OK, CHUNK_ERROR, CHUNK_EOF, CHUNK_SKIP };

/* Reads a statement or expression; leaves the compiled function (CHUNK_OK) or the syntax error
 * message (CHUNK_ERROR) on the stack. */
static int read_chunk(lua_State *L) {
  char *line;
  int r = read_line(PROMPT, &line);
  if (r == READ_EOF) return CHUNK_EOF;
  if (r == READ_INTERRUPT) return CHUNK_SKIP;
  if (line[strspn(line, " \t")] == '\0') { free(line); return CHUNK_SKIP; }
  const char *code = line[0] == '=' ? line + 1 : line;  /* `=expr`, as Lua 5.1/5.2 had */
  lua_pushfstring(L, "return %s;", code);
  int status = luaL_loadbuffer(L, lua_tostring(L, -1), lua_rawlen(L, -1), "=stdin");
  lua_remove(L, -2);
  if (status == LUA_OK) {
    history_add(line);
    free(line);
    return CHUNK_OK;
  }
  lua_pop(L, 1);
  luaL_Buffer b;                         /* a statement, possibly over several lines */
  lua_pushstring(L, line);
  free(line);
  for (;;) {
    status = luaL_loadbuffer(L, lua_tostring(L, -1), lua_rawlen(L, -1), "=stdin");
    if (!incomplete(L, status)) break;
    lua_pop(L, 1);                       /* the message */
    r = read_line(PROMPT2, &line);
    if (r == READ_INTERRUPT) { lua_pop(L, 1); return CHUNK_SKIP; }
    if (r == READ_EOF) {                 /* report the incomplete chunk as it stands */
      status = luaL_loadbuffer(L, lua_tostring(L, -1), lua_rawlen(L, -1), "=stdin");
      break;
    }
    luaL_buffinit(L, &b);
    lua_pushvalue(L, -2);                /* the text so far (below the buffer's slot) */
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    luaL_addstring(&b, line);
    free(line);
    luaL_pushresult(&b);
    lua_remove(L, -2);
  }
  history_add(lua_tostring(L, -2));
  lua_remove(L, -2);                     /* the text; leaves the function or the message */
  return status == LUA_OK ? CHUNK_OK : CHUNK_ERROR;
}

/* Prints the values above `base` with the helper's format (tensors by their __tostring,
 * tables in one brief line). */
static void print_results(lua_State *L, int base) {
  int n = lua_gettop(L) - base;
  if (n <= 0) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, helper_ref);
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "format");
    lua_remove(L, -2);
  } else {
    lua_pop(L, 1);
    lua_getglobal(L, "tostring");
    if (n > 1) lua_settop(L, base + 1), n = 1;
  }
  lua_insert(L, base + 1);
  int status = host_docall(L, n, 1);
  if (status == LUA_OK) {
    const char *s = lua_tostring(L, -1);
    if (s) { fputs(s, stdout); fputc('\n', stdout); }
  } else {
    host_report(L, status, 0);
  }
  fflush(stdout);
  lua_settop(L, base);
}

static void load_helper(lua_State *L) {
  if (luaL_loadbuffer(L, host_repl_lua, strlen(host_repl_lua), "=repl") == LUA_OK &&
      lua_pcall(L, 0, 1, 0) == LUA_OK) {
    helper_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else {                               /* a bug here: still give a plain REPL */
    fprintf(stderr, "%s: repl helper: %s\n", host_progname, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

/* The REPL has `flower` loaded as a global, as Torch's `th` had `torch`. */
static void load_flower(lua_State *L) {
  lua_getglobal(L, "flower");
  int present = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (present) return;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "flower");
  if (host_docall(L, 1, 1) == LUA_OK) {
    lua_setglobal(L, "flower");
    /* help(x) prints the documentation of a function, module or layer (flower.help) */
    if (luaL_dostring(L, "help = flower.help") != LUA_OK) host_report(L, LUA_ERRRUN, 0);
  } else {
    fprintf(stderr, "%s: warning: could not load the flower library (set FLOWERLUA_PATH?):\n",
            host_progname);
    host_report(L, LUA_ERRRUN, 0);
  }
}

void host_repl(lua_State *L) {
  /* Between statements Ctrl-C must not kill the REPL: from here on SIGINT only sets a flag,
   * except while a statement runs (host_docall) or a line is read (read_readline). */
  struct sigaction sa, old_int;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = prompt_sigint;
  sigaction(SIGINT, &sa, &old_int);
  repl_L = L;
  use_readline = isatty(STDIN_FILENO);
  load_helper(L);
  load_flower(L);
  if (use_readline) {
    readline_setup();
    printf("flower is loaded; Tab completes names, Ctrl-C interrupts, Ctrl-D exits.\n");
  }
  for (;;) {
    int base = lua_gettop(L);
    int r = read_chunk(L);
    if (r == CHUNK_EOF) break;
    if (r == CHUNK_SKIP) continue;
    if (r == CHUNK_ERROR) {
      fprintf(stderr, "%s\n", lua_tostring(L, -1));
      fflush(stderr);
      lua_settop(L, base);
      continue;
    }
    int status = host_docall(L, 0, LUA_MULTRET);
    if (status == LUA_OK) print_results(L, base);
    else host_report(L, status, 0);
    lua_settop(L, base);
  }
  fputc('\n', stdout);
  fflush(stdout);
  history_close();
  if (helper_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, helper_ref);
  helper_ref = LUA_NOREF;
  sigaction(SIGINT, &old_int, NULL);
}
