// The documented Node example for the official socket.io-client, made runnable as a test:
//
//   node client_example.mjs <url> [--message TEXT] [--session-id ID] [--transport polling|websocket]
//                                  [--auth-null] [--token TOKEN] [--expect-error] [--timeout MS]
//
// The answer is streamed to stdout as it arrives (as in the documentation); then one JSON
// line follows with everything received:
//   {"events": [{"event", "data"}...], "content", "response", "sessionId", "error", "transport"}
// Exit status: 0 after ai:complete (or ai:error with --expect-error), 1 on ai:error,
// 2 on timeout or connection failure, 64 on bad usage.
import { parseArgs } from 'node:util';
import { io } from 'socket.io-client';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    message: { type: 'string', default: 'Hello from the JavaScript client' },
    'session-id': { type: 'string' },
    transport: { type: 'string' },
    'auth-null': { type: 'boolean', default: false },
    token: { type: 'string' },
    'expect-error': { type: 'boolean', default: false },
    timeout: { type: 'string', default: '30000' },
  },
});
if (positionals.length !== 1) {
  process.stderr.write('usage: node client_example.mjs <url> [options]\n');
  process.exit(64);
}

const clientOptions = {};
if (options.transport) clientOptions.transports = [options.transport];
// the React/Vue examples pass localStorage.getItem('token'): null when logged out
if (options['auth-null']) clientOptions.auth = { token: null };
else if (options.token !== undefined) clientOptions.auth = { token: options.token };

const events = [];
let content = '';
let finished = false;

// --- the documented example --------------------------------------------------------
const socket = io(positionals[0], clientOptions);

const payload = { message: options.message };
if (options['session-id'] !== undefined) payload.sessionId = options['session-id'];
socket.emit('ai:chat', payload);

socket.on('ai:stream', (data) => {
  events.push({ event: 'ai:stream', data });
  content += data.content;
  process.stdout.write(data.content);
});

socket.on('ai:complete', (data) => {
  events.push({ event: 'ai:complete', data });
  finish(0, { response: data.response, sessionId: data.sessionId });
});

socket.on('ai:error', (data) => {
  events.push({ event: 'ai:error', data });
  finish(options['expect-error'] ? 0 : 1, { error: data, sessionId: data.sessionId ?? null });
});
// -------------------------------------------------------------------------------------

socket.on('connect_error', (err) => {
  events.push({ event: 'connect_error', data: { message: err.message } });
});

const timer = setTimeout(() => finish(2, { error: { code: 'client_timeout' } }), Number(options.timeout));

function finish(code, fields) {
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  const transport = socket.io.engine ? socket.io.engine.transport.name : null;
  const summary = { events, content, response: null, sessionId: null, error: null, transport, ...fields };
  socket.disconnect();
  process.stdout.write('\n' + JSON.stringify(summary) + '\n', () => process.exit(code));
}
