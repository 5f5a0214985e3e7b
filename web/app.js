// The chat page: a plain script, no build step, no other origin. What the model writes is
// shown as text (Text nodes), never parsed as HTML.
'use strict';

(function () {
  // This script is served at <root>web/app.js, and the API beside the page, at
  // <root>api/v2/...: so the page works at `/` and mounted under a prefix such as `/chat/`.
  const ROOT = new URL('../', document.currentScript.src);
  const API = new URL('api/v2/ai/chat/', ROOT);
  const SOCKET_PATH = new URL('socket.io/', ROOT).pathname;
  const SOCKET_BUNDLE = new URL('web/vendor/socket.io.min.js', ROOT).href;
  const RESUME_ATTEMPTS = 5;
  const CANCEL_ATTEMPTS = 5;
  const KEYS = { token: 'aichat.token', transport: 'aichat.transport', session: 'aichat.sessionId',
                 pending: 'aichat.pendingAnswer' };

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: document.querySelector('.app'), conversation: $('conversation'), messages: $('messages'),
    empty: $('empty'), form: $('composer'), message: $('message'), send: $('send'), stop: $('stop'),
    newChat: $('new-chat'), token: $('token'), transport: $('transport'), sessions: $('sessions'),
    sessionList: $('session-list'), error: $('error'), status: $('status'),
  };

  const state = {
    sessionId: null,
    answer: null, // the answer being streamed (one at a time)
    socket: null, // a Promise of the Socket.IO client, made on first use
    followBottom: true, // keep the newest text in view, unless the reader scrolled up
    scrollQueued: false,
  };

  // --- small helpers ----------------------------------------------------------------

  const stored = {
    get(key) { try { return localStorage.getItem(key); } catch { return null; } },
    set(key, value) {
      try { if (value === null || value === '') localStorage.removeItem(key); else localStorage.setItem(key, value); }
      catch { /* storage unavailable (private mode): the page works without it */ }
    },
  };

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const apiUrl = (path) => new URL(path, API).href;
  const token = () => ui.token.value.trim() || null;
  const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

  function newSessionId() {
    if (crypto.randomUUID) return crypto.randomUUID(); // secure contexts only (https, localhost)
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function formatWait(seconds) {
    if (seconds < 90) return `${seconds} s`;
    return `${seconds} s (about ${Math.round(seconds / 60)} min)`;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- errors and status ------------------------------------------------------------

  async function errorFrom(response) {
    let body = null;
    try { body = await response.json(); } catch { /* not JSON (a proxy's page) */ }
    const retry = response.headers.get('Retry-After');
    return {
      status: response.status,
      code: (body && typeof body.code === 'string') ? body.code : `http_${response.status}`,
      error: (body && typeof body.error === 'string') ? body.error : (response.statusText || 'Request failed.'),
      retryAfter: retry !== null && /^\d+$/.test(retry) ? Number(retry) : null,
    };
  }

  const NETWORK_ERROR = { code: 'network_error', error: 'The server could not be reached.' };

  function showError({ code, error, status, retryAfter }) {
    const parts = [element('strong', 'code', code)];
    if (status) parts.push(element('span', 'http-status', `HTTP ${status}`));
    parts.push(element('span', 'text', error));
    if (typeof retryAfter === 'number') {
      parts.push(element('span', 'wait', `Try again in ${formatWait(retryAfter)}.`));
    }
    ui.error.replaceChildren(...parts);
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
    ui.error.replaceChildren();
  }

  function setStatus(text) { ui.status.textContent = text; }

  // --- messages -----------------------------------------------------------------------

  function nearBottom() {
    const box = ui.conversation;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollDown() { ui.conversation.scrollTop = ui.conversation.scrollHeight; }

  function addMessage(role, content) {
    const item = element('li', `message ${role}`);
    const body = element('div', 'body');
    body.dataset.role = role;
    const text = document.createTextNode(content);
    body.append(text);
    const meta = element('div', 'meta');
    item.append(body, meta);
    ui.messages.append(item);
    ui.empty.hidden = true;
    state.followBottom = true;
    scrollDown();
    return { item, body, text, meta };
  }

  function markMessage(view, status, note) {
    view.body.dataset.status = status;
    view.item.dataset.status = status;
    view.meta.textContent = note || '';
  }

  function clearMessages() {
    ui.messages.replaceChildren();
    ui.empty.hidden = false;
  }

  function setSession(sessionId) {
    state.sessionId = sessionId;
    stored.set(KEYS.session, sessionId);
    for (const button of ui.sessionList.querySelectorAll('button')) {
      button.setAttribute('aria-current', String(button.dataset.sessionId === sessionId));
    }
  }

  // --- one answer ---------------------------------------------------------------------

  function startAnswer(sessionId, transport) {
    const answer = {
      sessionId, transport, messageId: null, lastEventId: null, seq: 0,
      view: addMessage('assistant', ''), ended: false, stopping: false, userView: null,
    };
    markMessage(answer.view, 'streaming', '');
    state.answer = answer;
    updateControls();
    return answer;
  }

  function knowMessage(answer, messageId) {
    if (answer.messageId || !messageId) return;
    answer.messageId = messageId;
    // survives a reload: the page then resumes this answer from the start
    stored.set(KEYS.pending, JSON.stringify({ sessionId: answer.sessionId, messageId }));
  }

  // Per chunk: one appendData; the scroll (which needs a layout) at most once per frame.
  function appendChunk(answer, content) {
    answer.view.text.appendData(content);
    if (state.followBottom && !state.scrollQueued) {
      state.scrollQueued = true;
      requestAnimationFrame(() => {
        state.scrollQueued = false;
        if (state.followBottom) scrollDown();
      });
    }
  }

  function endAnswer(answer, outcome, error) {
    if (answer.ended) return;
    answer.ended = true;
    const notes = { complete: '', cancelled: 'Stopped', error: `Error: ${error ? error.code : 'unknown'}` };
    markMessage(answer.view, outcome, notes[outcome]);
    if (error) showError(error);
    stored.set(KEYS.pending, null);
    if (state.answer === answer) state.answer = null;
    setStatus('');
    updateControls();
    if (token()) refreshSessions();
  }

  // the request was refused before anything started: nothing was stored
  function refuseAnswer(answer, error, message) {
    answer.ended = true;
    answer.view.item.remove();
    if (answer.userView) markMessage(answer.userView, 'refused', 'Not sent');
    if (!ui.message.value && message) {
      ui.message.value = message;
      resizeInput();
    }
    if (state.answer === answer) state.answer = null;
    showError(error);
    setStatus('');
    updateControls();
  }

  function updateControls() {
    const busy = state.answer !== null;
    ui.send.disabled = busy;
    ui.stop.disabled = !busy || state.answer.stopping;
    ui.newChat.disabled = busy;
    ui.transport.disabled = busy;
    for (const button of ui.sessionList.querySelectorAll('button')) button.disabled = busy;
  }

  async function send() {
    const message = ui.message.value;
    if (!message.trim() || state.answer) return;
    hideError();
    if (!state.sessionId) setSession(newSessionId());
    ui.message.value = '';
    resizeInput();
    const userView = addMessage('user', message);
    const transport = ui.transport.value;
    const answer = startAnswer(state.sessionId, transport);
    answer.userView = userView;
    if (transport === 'socketio') await sendOverSocket(answer, message);
    else await sendOverSse(answer, message);
  }

  // --- SSE: fetch + ReadableStream ----------------------------------------------------

  async function sendOverSse(answer, message) {
    setStatus('Waiting for the answer…');
    let response;
    try {
      response = await fetch(apiUrl('stream'), {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', ...authHeaders() },
        body: JSON.stringify({ message, sessionId: answer.sessionId }),
        cache: 'no-store',
      });
    } catch {
      return refuseAnswer(answer, NETWORK_ERROR, message);
    }
    if (!response.ok) return refuseAnswer(answer, await errorFrom(response), message);
    await followSse(answer, response);
  }

  // Reads the answer to its last frame; when the connection drops, resumes it from the last
  // `id:` received (GET stream/{messageId} with Last-Event-ID), a few times.
  async function followSse(answer, response) {
    let failures = 0;
    for (;;) {
      if (response) {
        setStatus('');
        const before = answer.lastEventId;
        let ended = false;
        try { ended = await readFrames(response, answer); } catch { /* dropped mid-stream */ }
        if (ended || answer.ended) return;
        if (answer.lastEventId !== before) failures = 0; // it was making progress
      }
      if (!answer.messageId) {
        return endAnswer(answer, 'error', { code: 'network_error', error: 'The connection was lost.' });
      }
      failures += 1;
      if (failures > RESUME_ATTEMPTS) {
        return endAnswer(answer, 'error', { code: 'network_error', error: 'The connection was lost.' });
      }
      setStatus('Connection lost: resuming…');
      markMessage(answer.view, 'streaming', 'Reconnecting…');
      await sleep(failures === 1 ? 100 : 500 * failures);
      response = await resumeSse(answer);
      if (response && !response.ok) {
        const error = await errorFrom(response);
        if (error.status < 500) return endAnswer(answer, 'error', error);
        response = null;
      }
      if (response) markMessage(answer.view, 'streaming', '');
    }
  }

  async function resumeSse(answer) {
    const headers = authHeaders();
    // without an id yet, the answer is replayed from its start
    if (answer.lastEventId) headers['Last-Event-ID'] = answer.lastEventId;
    try {
      return await fetch(apiUrl(`stream/${encodeURIComponent(answer.messageId)}`), { headers, cache: 'no-store' });
    } catch {
      return null;
    }
  }

  // SSE parsing, line by line: `id:` and `data:` fields, a blank line ends a frame, lines
  // starting with `:` are comments (pings). Returns true after the last frame (done or error).
  async function readFrames(response, answer) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let data = [];
    let id = null;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return false;
        buffer += decoder.decode(value, { stream: true });
        let start = 0;
        let end;
        while ((end = buffer.indexOf('\n', start)) !== -1) {
          let line = buffer.slice(start, end);
          start = end + 1;
          if (line.endsWith('\r')) line = line.slice(0, -1);
          if (line === '') {
            if (data.length) {
              const frame = JSON.parse(data.join('\n'));
              data = [];
              if (onFrame(answer, frame, id)) return true;
            }
            id = null;
            continue;
          }
          if (line.startsWith(':')) continue;
          const colon = line.indexOf(':');
          const field = colon === -1 ? line : line.slice(0, colon);
          let fieldValue = colon === -1 ? '' : line.slice(colon + 1);
          if (fieldValue.startsWith(' ')) fieldValue = fieldValue.slice(1);
          if (field === 'id') id = fieldValue;
          else if (field === 'data') data.push(fieldValue);
        }
        buffer = buffer.slice(start);
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function onFrame(answer, frame, id) {
    knowMessage(answer, frame.messageId);
    if (typeof frame.content === 'string') {
      appendChunk(answer, frame.content);
      if (id) answer.lastEventId = id; // only once its text is shown: resume continues after it
      return false;
    }
    if (id) answer.lastEventId = id;
    if (frame.done) {
      endAnswer(answer, frame.cancelled ? 'cancelled' : 'complete');
      return true;
    }
    if (frame.error) {
      endAnswer(answer, 'error', { code: frame.code, error: frame.error });
      return true;
    }
    return false;
  }

  // --- Socket.IO ----------------------------------------------------------------------

  function loadSocketBundle() {
    if (window.io) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = SOCKET_BUNDLE;
      script.onload = () => resolve();
      script.onerror = () => reject(new Error('socket.io-client bundle not found'));
      document.head.append(script);
    });
  }

  function socketAnswer(data) {
    const answer = state.answer;
    if (!answer || answer.transport !== 'socketio' || !data || data.sessionId !== answer.sessionId) return null;
    if (answer.messageId && data.messageId && data.messageId !== answer.messageId) return null;
    return answer;
  }

  function connectSocket() {
    if (state.socket) return state.socket;
    state.socket = loadSocketBundle().then(() => {
      // the token goes with each message (it may change); the handshake carries none
      const socket = window.io(ROOT.origin, { path: SOCKET_PATH });
      socket.on('ai:stream', (data) => {
        const answer = socketAnswer(data);
        if (!answer) return;
        knowMessage(answer, data.messageId);
        appendChunk(answer, data.content);
        if (typeof data.seq === 'number') answer.seq = data.seq;
      });
      socket.on('ai:complete', (data) => {
        const answer = socketAnswer(data);
        if (answer) endAnswer(answer, data.cancelled ? 'cancelled' : 'complete');
      });
      socket.on('ai:error', (data) => {
        const answer = state.answer;
        const error = { code: data.code, error: data.error, retryAfter: data.retryAfter };
        if (answer && answer.transport === 'socketio' && (!data.sessionId || data.sessionId === answer.sessionId)) {
          if (answer.stopping && data.code === 'not_found' && !data.messageId) return; // a stop that came too early
          if (!answer.messageId && !answer.view.text.length) return refuseAnswer(answer, error, answer.message);
          return endAnswer(answer, 'error', error);
        }
        showError(error);
      });
      socket.on('disconnect', () => {
        const answer = state.answer;
        if (answer && answer.transport === 'socketio') {
          answer.disconnected = true;
          setStatus('Connection lost: resuming…');
          markMessage(answer.view, 'streaming', 'Reconnecting…');
        }
      });
      socket.on('connect', () => {
        setStatus('');
        const answer = state.answer;
        if (!answer || answer.transport !== 'socketio' || !answer.disconnected) return;
        answer.disconnected = false;
        if (!answer.messageId) {
          return endAnswer(answer, 'error', { code: 'network_error', error: 'The connection was lost.' });
        }
        markMessage(answer.view, 'streaming', '');
        socket.emit('ai:resume', { messageId: answer.messageId, afterSeq: answer.seq, token: token() });
      });
      socket.on('connect_error', () => setStatus('Cannot reach the server over Socket.IO: retrying…'));
      return socket;
    });
    state.socket.catch(() => { state.socket = null; });
    return state.socket;
  }

  async function sendOverSocket(answer, message) {
    answer.message = message;
    let socket;
    try {
      socket = await connectSocket();
    } catch {
      return refuseAnswer(answer, { code: 'unavailable', error: 'The Socket.IO client could not be loaded.' },
                          message);
    }
    socket.emit('ai:chat', { message, sessionId: answer.sessionId, token: token() });
  }

  // --- stop ---------------------------------------------------------------------------

  async function stop() {
    const answer = state.answer;
    if (!answer || answer.stopping) return;
    answer.stopping = true;
    updateControls();
    setStatus('Stopping…');
    if (answer.transport === 'socketio') {
      const socket = await connectSocket();
      socket.emit('ai:cancel', { sessionId: answer.sessionId, token: token() });
      return;
    }
    const url = apiUrl(`sessions/${encodeURIComponent(answer.sessionId)}/cancel`);
    for (let attempt = 0; attempt < CANCEL_ATTEMPTS && !answer.ended; attempt++) {
      let response = null;
      try { response = await fetch(url, { method: 'POST', headers: authHeaders() }); } catch { /* retried */ }
      if (response && response.ok) return; // the stream itself ends, with `cancelled`
      if (response && response.status !== 404) {
        showError(await errorFrom(response));
        break;
      }
      await sleep(200); // 404: the answer may not have started yet
    }
    if (!answer.ended) {
      answer.stopping = false;
      setStatus('');
      updateControls();
    }
  }

  // --- sessions -----------------------------------------------------------------------

  async function refreshSessions() {
    if (!token()) {
      ui.sessions.hidden = true;
      ui.app.classList.remove('with-sessions');
      ui.sessionList.replaceChildren();
      return;
    }
    let response;
    try {
      response = await fetch(apiUrl('sessions'), { headers: authHeaders(), cache: 'no-store' });
    } catch {
      return showError(NETWORK_ERROR);
    }
    if (!response.ok) {
      ui.sessions.hidden = true;
      ui.app.classList.remove('with-sessions');
      return showError(await errorFrom(response));
    }
    const { sessions } = await response.json();
    const items = sessions.map((session) => {
      const button = element('button', 'session');
      button.type = 'button';
      button.dataset.sessionId = session.sessionId;
      button.setAttribute('aria-current', String(session.sessionId === state.sessionId));
      const when = new Date(session.updatedAt);
      button.append(element('span', 'title', session.title || session.sessionId),
                    element('span', 'when', isNaN(when) ? '' : when.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' })));
      button.addEventListener('click', () => openSession(session.sessionId));
      const item = element('li');
      item.append(button);
      return item;
    });
    if (!items.length) items.push(element('li', 'none', 'No chats yet.'));
    ui.sessionList.replaceChildren(...items);
    ui.sessions.hidden = false;
    ui.app.classList.add('with-sessions');
    updateControls();
  }

  const STATUS_NOTES = { partial: 'Stopped before the end', error: 'No answer (error)' };

  // Shows a stored conversation and continues it. Returns its messages, or null.
  async function openSession(sessionId, { quiet = false } = {}) {
    if (state.answer) return null;
    let response;
    try {
      response = await fetch(apiUrl(`sessions/${encodeURIComponent(sessionId)}`),
                             { headers: authHeaders(), cache: 'no-store' });
    } catch {
      if (!quiet) showError(NETWORK_ERROR);
      return null;
    }
    if (!response.ok) {
      if (response.status === 404 && sessionId === state.sessionId) setSession(null);
      if (!quiet) showError(await errorFrom(response));
      return null;
    }
    const { messages } = await response.json();
    hideError();
    clearMessages();
    setSession(sessionId);
    for (const message of messages) {
      const view = addMessage(message.role, message.content);
      view.item.dataset.messageId = message.id;
      markMessage(view, message.status, message.role === 'assistant' ? STATUS_NOTES[message.status] : '');
    }
    return messages;
  }

  function newChat() {
    if (state.answer) return;
    setSession(null);
    clearMessages();
    hideError();
    ui.message.focus();
  }

  // --- start-up -----------------------------------------------------------------------

  function resizeInput() {
    ui.message.style.height = 'auto';
    ui.message.style.height = `${ui.message.scrollHeight}px`;
  }

  // After a reload: the conversation comes back from the history API, and an answer that
  // was still streaming is replayed from its start and followed to its end.
  async function restore() {
    const sessionId = stored.get(KEYS.session);
    if (!sessionId) return;
    const messages = await openSession(sessionId, { quiet: true });
    let pending = null;
    try { pending = JSON.parse(stored.get(KEYS.pending) || 'null'); } catch { /* ignored */ }
    stored.set(KEYS.pending, null);
    if (!messages || !pending || pending.sessionId !== sessionId) return;
    const stale = [...ui.messages.children].find((item) => item.dataset.messageId === pending.messageId);
    if (!stale) return;
    stale.remove();
    const answer = startAnswer(sessionId, 'sse');
    knowMessage(answer, pending.messageId);
    await followSse(answer, null);
  }

  function start() {
    ui.token.value = stored.get(KEYS.token) || '';
    const transport = stored.get(KEYS.transport);
    if (transport === 'sse' || transport === 'socketio') ui.transport.value = transport;

    ui.form.addEventListener('submit', (event) => { event.preventDefault(); send(); });
    ui.message.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      }
    });
    ui.message.addEventListener('input', resizeInput);
    ui.conversation.addEventListener('scroll', () => { state.followBottom = nearBottom(); }, { passive: true });
    ui.stop.addEventListener('click', stop);
    ui.newChat.addEventListener('click', newChat);
    ui.transport.addEventListener('change', () => stored.set(KEYS.transport, ui.transport.value));
    let tokenTimer = null;
    const tokenChanged = () => {
      clearTimeout(tokenTimer);
      stored.set(KEYS.token, token());
      hideError();
      refreshSessions();
    };
    ui.token.addEventListener('change', tokenChanged);
    ui.token.addEventListener('input', () => { clearTimeout(tokenTimer); tokenTimer = setTimeout(tokenChanged, 500); });

    updateControls();
    refreshSessions();
    restore().finally(() => { document.body.dataset.ready = 'true'; });
  }

  start();
})();
