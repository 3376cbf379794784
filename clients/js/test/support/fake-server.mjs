// A small fake Pusher-protocol server for the add-on's tests (ws package,
// 127.0.0.1, ephemeral port). It records every frame it receives and lets the
// test decide how to answer each pusher:subscribe.
import { WebSocketServer } from 'ws';
import { once } from 'node:events';
import Pusher from 'pusher-js';

/** Upper bound for any single wait; never used for synchronisation. */
export const DEADLINE_MS = 20000;

/** Resolves with the value of `promise`, or rejects after DEADLINE_MS. */
export function within(promise, what, ms = DEADLINE_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves with the data of the next `eventName` emitted on a pusher-js dispatcher. */
export function nextEvent(dispatcher, eventName) {
  return within(
    new Promise((resolve) => {
      const fn = (data) => {
        dispatcher.unbind(eventName, fn);
        resolve(data);
      };
      dispatcher.bind(eventName, fn);
    }),
    `event ${eventName}`,
  );
}

/** A FIFO whose next() waits for the next pushed item. */
class Queue {
  constructor(what) {
    this.what = what;
    this.items = [];
    this.waiters = [];
  }
  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(item);
    else this.items.push(item);
  }
  next() {
    if (this.items.length > 0) return Promise.resolve(this.items.shift());
    return within(new Promise((resolve) => this.waiters.push(resolve)), this.what);
  }
}

export async function startFakeServer() {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const queues = new Map();
  const queue = (key) => {
    if (!queues.has(key)) queues.set(key, new Queue(key));
    return queues.get(key);
  };
  const server = {
    port: wss.address().port,
    /** every frame received, decoded: { event, data, channel } */
    frames: [],
    /** the socket currently subscribed to each channel */
    socketFor: new Map(),
    /**
     * How to answer a subscribe: (channel, data) => null to stay silent, or
     * { error } to refuse, or { fields, events } for
     * subscription_succeeded with extra fields in its data, followed by
     * events [{ event, data, position }].
     */
    answer: () => ({ fields: {} }),
    connections: new Queue('a connection'),

    /** The next pusher:subscribe received for `channel` (its data object). */
    nextSubscribe(channel) {
      return queue(`subscribe ${channel}`).next();
    },
    nextUnsubscribe(channel) {
      return queue(`unsubscribe ${channel}`).next();
    },
    send(socket, event, channel, data, position) {
      const frame = { event, channel, data: typeof data === 'string' ? data : JSON.stringify(data) };
      if (position !== undefined) frame.position = position;
      socket.send(JSON.stringify(frame));
    },
    /** Sends an event on a channel to the socket subscribed to it. */
    publish(channel, event, data, position) {
      const socket = server.socketFor.get(channel);
      if (!socket) throw new Error(`no socket subscribed to ${channel}`);
      server.send(socket, event, channel, data, position);
    },
    /** Drops the connection of the socket subscribed to `channel` without a close handshake. */
    dropConnectionOf(channel) {
      const socket = server.socketFor.get(channel);
      if (!socket) throw new Error(`no socket subscribed to ${channel}`);
      socket.terminate();
    },
    async close() {
      for (const client of wss.clients) client.terminate();
      await new Promise((resolve) => wss.close(resolve));
    },
  };

  wss.on('connection', (socket) => {
    socket.send(
      JSON.stringify({
        event: 'pusher:connection_established',
        data: JSON.stringify({ socket_id: '1.1', activity_timeout: 120 }),
      }),
    );
    server.connections.push(socket);
    socket.on('message', (raw) => {
      const frame = JSON.parse(raw.toString());
      server.frames.push(frame);
      if (frame.event === 'pusher:ping') {
        socket.send(JSON.stringify({ event: 'pusher:pong', data: '{}' }));
      } else if (frame.event === 'pusher:subscribe') {
        const channel = frame.data.channel;
        server.socketFor.set(channel, socket);
        const answer = server.answer(channel, frame.data);
        // Record before answering so that a test awaiting the subscribe sees
        // it no later than the answer reaches the client.
        queue(`subscribe ${channel}`).push(frame.data);
        if (!answer) return;
        if (answer.error) {
          server.send(socket, 'pusher:subscription_error', channel, answer.error);
          return;
        }
        server.send(socket, 'pusher_internal:subscription_succeeded', channel, {
          ...(answer.data || {}),
          ...answer.fields,
        });
        for (const e of answer.events || []) {
          server.send(socket, e.event, channel, e.data ?? {}, e.position);
        }
      } else if (frame.event === 'pusher:unsubscribe') {
        queue(`unsubscribe ${frame.data.channel}`).push(frame.data);
      }
    });
  });
  return server;
}

/** A stock pusher-js client pointed at the fake server (not yet connected). */
export function makePusher(server, extra = {}) {
  return new Pusher('app-key', {
    wsHost: '127.0.0.1',
    wsPort: server.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    cluster: 'x',
    ...extra,
  });
}

/** Disconnects the client and waits until pusher-js reports it disconnected. */
export async function closeClient(pusher) {
  if (pusher.connection.state === 'disconnected') return;
  const done = nextEvent(pusher.connection, 'disconnected');
  pusher.disconnect();
  await done;
}
