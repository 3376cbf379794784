// @pushmesh/pusher-js-addon
//
// Adds pushmesh's history recovery (positions) and filtered subscriptions to a
// STOCK pusher-js instance. Nothing in pusher-js is patched: the add-on only
// replaces two methods on the one Pusher object it is given (`send_event`,
// `unsubscribe`) and binds listeners through pusher-js's own event API.
//
// How the pieces fit (pusher-js 8.x internals, all reached through the
// instance):
//  - Every `pusher:subscribe` is sent through `pusher.send_event(...)` (by
//    Channel#subscribe, also on every resubscribe after a reconnect). The
//    wrapper adds `position` and/or `filter` to that event's data.
//  - pusher-js's protocol decoder keeps only `event`, `channel`, `data` and
//    `user_id` of a frame, so the top-level `position` never reaches channel
//    callbacks. The add-on therefore reads the raw frames on the transport
//    (`pusher.connection.connection.transport`, an EventsDispatcher) through
//    `bind_global`. Global callbacks of a dispatcher run before its bound
//    callbacks, and pusher-js decodes and dispatches a frame to the channel
//    from a bound callback, so a frame's position is recorded before any
//    application handler for that frame runs.
//  - After pusher-js has dispatched `pusher_internal:subscription_succeeded`
//    (listener on `pusher.connection` 'message', bound after pusher-js's own),
//    the add-on emits `pushmesh:recovery` on the channel and calls
//    `onRecovery`.

const SUBSCRIBE = 'pusher:subscribe';
const SUCCEEDED = 'pusher_internal:subscription_succeeded';
export const RECOVERY_EVENT = 'pushmesh:recovery';

/** One hook per Pusher instance, shared by withRecovery and subscribeWithFilter. */
const hubs = new WeakMap();

function hasOwn(obj, key) {
  return Object.prototype.hasOwnProperty.call(obj, key);
}

class Hub {
  constructor(pusher) {
    this.pusher = pusher;
    /** @type {Map<string, object>} channel name -> frozen filter */
    this.filters = new Map();
    /** the attached recovery state, or null */
    this.recovery = null;
    this.installed = false;
    this.transport = null;
    this.onConnected = () => this.hookTransport();
    this.onMessage = (event) => {
      if (this.recovery) this.recovery._afterDispatch(event);
    };
    this.onRawFrame = (name, messageEvent) => {
      if (name === 'message' && this.recovery) this.recovery._rawFrame(messageEvent);
    };
  }

  static for(pusher) {
    let hub = hubs.get(pusher);
    if (!hub) {
      hub = new Hub(pusher);
      hubs.set(pusher, hub);
    }
    return hub;
  }

  install() {
    if (this.installed) return;
    const pusher = this.pusher;
    const hub = this;
    this.hadOwnSendEvent = hasOwn(pusher, 'send_event');
    this.hadOwnUnsubscribe = hasOwn(pusher, 'unsubscribe');
    const origSendEvent = pusher.send_event;
    const origUnsubscribe = pusher.unsubscribe;
    this.origSendEvent = origSendEvent;
    this.origUnsubscribe = origUnsubscribe;

    this.sendEventWrapper = function sendEvent(eventName, data, channel) {
      if (hub.installed && eventName === SUBSCRIBE && data && typeof data.channel === 'string') {
        data = hub.decorateSubscribe(data);
      }
      return origSendEvent.call(this, eventName, data, channel);
    };
    this.unsubscribeWrapper = function unsubscribe(channelName) {
      const result = origUnsubscribe.apply(this, arguments);
      // pusher-js removes the channel at once, or (if its subscription is still
      // pending) when the subscription succeeds and it calls unsubscribe again.
      if (hub.installed && !hub.pusher.channel(channelName)) hub.forgetChannel(channelName);
      return result;
    };
    pusher.send_event = this.sendEventWrapper;
    pusher.unsubscribe = this.unsubscribeWrapper;
    pusher.connection.bind('connected', this.onConnected);
    pusher.connection.bind('message', this.onMessage);
    this.installed = true;
    this.hookTransport();
  }

  /** Called when a feature goes away; removes every hook once nothing uses it. */
  maybeUninstall() {
    if (!this.installed || this.recovery || this.filters.size > 0) return;
    const pusher = this.pusher;
    this.installed = false;
    // Restore the methods if nobody wrapped them after us; otherwise our
    // wrappers stay in the chain as pass-throughs (installed === false).
    if (pusher.send_event === this.sendEventWrapper) {
      if (this.hadOwnSendEvent) pusher.send_event = this.origSendEvent;
      else delete pusher.send_event;
    }
    if (pusher.unsubscribe === this.unsubscribeWrapper) {
      if (this.hadOwnUnsubscribe) pusher.unsubscribe = this.origUnsubscribe;
      else delete pusher.unsubscribe;
    }
    pusher.connection.unbind('connected', this.onConnected);
    pusher.connection.unbind('message', this.onMessage);
    this.unhookTransport();
    hubs.delete(pusher);
  }

  /** Binds the raw-frame observer on the current transport (once per transport). */
  hookTransport() {
    if (!this.installed) return;
    const conn = this.pusher.connection && this.pusher.connection.connection;
    const transport = conn && conn.transport;
    if (!transport || transport === this.transport || typeof transport.bind_global !== 'function') {
      return;
    }
    this.unhookTransport();
    transport.bind_global(this.onRawFrame);
    this.transport = transport;
  }

  unhookTransport() {
    if (this.transport) {
      this.transport.unbind_global(this.onRawFrame);
      this.transport = null;
    }
  }

  decorateSubscribe(data) {
    // Make sure frames answering this subscribe are observed (normally done
    // already on 'connected').
    this.hookTransport();
    const name = data.channel;
    let extra = null;
    if (this.recovery) extra = this.recovery._onSubscribe(name);
    const filter = this.filters.get(name);
    if (filter !== undefined) extra = Object.assign(extra || {}, { filter });
    return extra ? Object.assign({}, data, extra) : data;
  }

  forgetChannel(name) {
    this.filters.delete(name);
    if (this.recovery) this.recovery._forget(name);
    this.maybeUninstall();
  }
}

function parseMaybeJSON(value) {
  if (typeof value !== 'string') return value;
  try {
    return JSON.parse(value);
  } catch (e) {
    return value;
  }
}

class Recovery {
  constructor(pusher, hub, options) {
    this._pusher = pusher;
    this._hub = hub;
    this._onRecovery = options.onRecovery;
    this._positions = new Map();
    this._recovered = new Map();
    /** channel -> position sent on its last subscribe (null: none sent) */
    this._sent = new Map();
    /** channel -> {recovered, position} to announce after pusher-js dispatched the reply */
    this._notices = new Map();
    this._attached = true;
  }

  /** Last position seen on the channel (or set with setPosition), or undefined. */
  position(channelName) {
    return this._positions.get(channelName);
  }

  /**
   * Result of the channel's last (re)subscribe: true if the server replayed the
   * missed events, false if it could not (refetch state), undefined while the
   * subscription is pending or when no position was sent and the server said
   * nothing.
   */
  recovered(channelName) {
    return this._recovered.get(channelName);
  }

  /** Sets (or, with undefined/null, clears) the position sent on the channel's next subscribe. */
  setPosition(channelName, position) {
    if (typeof channelName !== 'string') throw new TypeError('channel name must be a string');
    if (position === undefined || position === null) {
      this._positions.delete(channelName);
    } else if (typeof position === 'string') {
      this._positions.set(channelName, position);
    } else {
      throw new TypeError('position must be a string (an opaque token from the server)');
    }
  }

  /** Stops intercepting; the Pusher instance behaves as without the add-on for recovery. */
  detach() {
    if (!this._attached) return;
    this._attached = false;
    if (this._hub.recovery === this) this._hub.recovery = null;
    this._notices.clear();
    this._hub.maybeUninstall();
  }

  get attached() {
    return this._attached;
  }

  _onSubscribe(name) {
    const position = this._positions.get(name);
    this._recovered.delete(name);
    this._notices.delete(name);
    if (position === undefined) {
      this._sent.set(name, null);
      return null;
    }
    this._sent.set(name, position);
    return { position };
  }

  _forget(name) {
    this._positions.delete(name);
    this._recovered.delete(name);
    this._sent.delete(name);
    this._notices.delete(name);
  }

  /** Raw transport frame, before pusher-js decodes and dispatches it. */
  _rawFrame(messageEvent) {
    const raw = messageEvent && messageEvent.data;
    if (typeof raw !== 'string') return;
    // Cheap pre-check: most frames have neither.
    if (raw.indexOf('position') === -1 && raw.indexOf(SUCCEEDED) === -1) return;
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch (e) {
      return; // pusher-js reports the parse error itself
    }
    if (!msg || typeof msg !== 'object' || typeof msg.channel !== 'string') return;
    const name = msg.channel;
    // Frames for a channel the app no longer has (late frames after an
    // unsubscribe) must not bring its state back.
    if (!this._pusher.channel(name)) return;

    if (msg.event === SUCCEEDED) {
      const data = parseMaybeJSON(msg.data);
      const fields = data && typeof data === 'object' ? data : {};
      const sent = this._sent.has(name) ? this._sent.get(name) : null;
      this._sent.delete(name);
      let recovered;
      if (typeof fields.recovered === 'boolean') recovered = fields.recovered;
      else if (sent !== null) recovered = false; // a position was sent and the server did not confirm recovery
      const serverPosition =
        typeof fields.position === 'string'
          ? fields.position
          : typeof msg.position === 'string'
            ? msg.position
            : undefined;
      // When recovered, the missed events follow this frame and carry their
      // own positions; keep the position we resumed from until they arrive,
      // so that a drop during the replay resumes from the last event seen.
      // Otherwise the server's current position is where we are now.
      if (serverPosition !== undefined && (recovered !== true || !this._positions.has(name))) {
        this._positions.set(name, serverPosition);
      }
      if (recovered === undefined) {
        this._recovered.delete(name);
      } else {
        this._recovered.set(name, recovered);
        this._notices.set(name, { recovered, position: this._positions.get(name) });
      }
      return;
    }
    if (typeof msg.position === 'string') {
      this._positions.set(name, msg.position);
    }
  }

  /** Decoded message, after pusher-js dispatched it to the channel. */
  _afterDispatch(event) {
    if (!event || event.event !== SUCCEEDED || typeof event.channel !== 'string') return;
    const notice = this._notices.get(event.channel);
    if (!notice) return;
    this._notices.delete(event.channel);
    const channel = this._pusher.channel(event.channel);
    if (!channel) return;
    const info = { recovered: notice.recovered, position: notice.position };
    channel.emit(RECOVERY_EVENT, info);
    if (this._onRecovery) this._onRecovery(event.channel, info);
  }
}

function assertPusher(pusher) {
  if (
    !pusher ||
    typeof pusher.send_event !== 'function' ||
    typeof pusher.channel !== 'function' ||
    !pusher.connection ||
    typeof pusher.connection.bind !== 'function'
  ) {
    throw new TypeError('expected a pusher-js Pusher instance');
  }
}

/**
 * Adds history recovery to a pusher-js instance.
 *
 * @param {import('pusher-js').default} pusher
 * @param {{ onRecovery?: (channelName: string, info: { recovered: boolean, position: string | undefined }) => void }} [options]
 */
export function withRecovery(pusher, options = {}) {
  assertPusher(pusher);
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
  if (options.onRecovery !== undefined && typeof options.onRecovery !== 'function') {
    throw new TypeError('options.onRecovery must be a function');
  }
  const hub = Hub.for(pusher);
  if (hub.recovery) {
    throw new Error('withRecovery is already attached to this Pusher instance; detach() it first');
  }
  const recovery = new Recovery(pusher, hub, options);
  hub.recovery = recovery;
  hub.install();
  return recovery;
}

/**
 * Checks a filter's shape: a plain object whose values are strings or arrays
 * of strings. Throws TypeError otherwise. Returns a frozen copy.
 */
export function validateFilter(filter) {
  if (filter === null || typeof filter !== 'object' || Array.isArray(filter)) {
    throw new TypeError('filter must be an object whose values are strings or arrays of strings');
  }
  const proto = Object.getPrototypeOf(filter);
  if (proto !== Object.prototype && proto !== null) {
    throw new TypeError('filter must be a plain object');
  }
  const copy = {};
  for (const key of Object.keys(filter)) {
    const value = filter[key];
    if (typeof value === 'string') {
      copy[key] = value;
    } else if (Array.isArray(value) && value.every((v) => typeof v === 'string')) {
      copy[key] = Object.freeze(value.slice());
    } else {
      throw new TypeError(`filter value for '${key}' must be a string or an array of strings`);
    }
  }
  return Object.freeze(copy);
}

function canonical(filter) {
  return JSON.stringify(Object.keys(filter).sort().map((k) => [k, filter[k]]));
}

function sameFilter(a, b) {
  if (a === undefined || b === undefined) return false;
  return canonical(a) === canonical(b);
}

/**
 * Subscribes to a channel with a server-side filter. Returns the stock
 * pusher-js Channel; the filter is sent on every (re)subscribe of that
 * channel until it is unsubscribed.
 */
export function subscribeWithFilter(pusher, channelName, filter) {
  assertPusher(pusher);
  if (typeof channelName !== 'string' || channelName === '') {
    throw new TypeError('channel name must be a non-empty string');
  }
  const checked = validateFilter(filter);
  const hub = Hub.for(pusher);
  const existing = pusher.channel(channelName);
  if (
    existing &&
    (existing.subscribed || existing.subscriptionPending) &&
    !sameFilter(hub.filters.get(channelName), checked)
  ) {
    throw new Error(
      `channel '${channelName}' is already subscribed with another filter (or none); unsubscribe it first`,
    );
  }
  hub.filters.set(channelName, checked);
  hub.install();
  return pusher.subscribe(channelName);
}

/** The filter sent for a channel's subscribes, or undefined. */
export function filterOf(pusher, channelName) {
  const hub = hubs.get(pusher);
  return hub ? hub.filters.get(channelName) : undefined;
}
