// Types for @pushmesh/pusher-js-addon (hand-written; the package has no build step).
import type Pusher from 'pusher-js';
import type { Channel } from 'pusher-js';

/** Name of the event emitted on a channel after each (re)subscribe whose recovery result is known. */
export declare const RECOVERY_EVENT: 'pushmesh:recovery';

/** What a (re)subscribe of a history channel gave. */
export interface RecoveryInfo {
  /**
   * true: the server replays the events missed since the position sent; they
   * follow, in order, before live events.
   * false: the events since the position sent cannot be replayed: refetch the
   * channel's state.
   */
  recovered: boolean;
  /** The position the add-on holds for the channel after this reply (opaque). */
  position: string | undefined;
}

export interface RecoveryOptions {
  /** Called after pusher-js has dispatched the channel's subscription_succeeded. */
  onRecovery?: (channelName: string, info: RecoveryInfo) => void;
}

export interface Recovery {
  /** Last position seen on the channel (or set with setPosition), or undefined. */
  position(channelName: string): string | undefined;
  /**
   * Result of the channel's last (re)subscribe: true or false when a position
   * was sent (or the server said), undefined while pending or when there was
   * nothing to recover.
   */
  recovered(channelName: string): boolean | undefined;
  /** Sets the position sent on the channel's next subscribe; undefined or null clears it. */
  setPosition(channelName: string, position: string | undefined | null): void;
  /** Stops intercepting for recovery (filters set with subscribeWithFilter keep working). */
  detach(): void;
  /** false after detach(). */
  readonly attached: boolean;
}

/** Adds history recovery to a stock pusher-js instance. One per instance at a time. */
export declare function withRecovery(pusher: Pusher, options?: RecoveryOptions): Recovery;

/** A subscription filter: each key matches a string value or any of several. */
export type Filter = { readonly [key: string]: string | readonly string[] };

/**
 * Subscribes with a server-side filter and returns the stock Channel; the
 * filter is sent on every (re)subscribe of the channel until it is
 * unsubscribed. Throws TypeError for a filter of the wrong shape, Error if the
 * channel is already subscribed with another filter (or none).
 */
export declare function subscribeWithFilter(pusher: Pusher, channelName: string, filter: Filter): Channel;

/** Checks a filter's shape (throws TypeError) and returns a frozen copy. */
export declare function validateFilter(filter: unknown): Filter;

/** The filter sent on the channel's subscribes, or undefined. */
export declare function filterOf(pusher: Pusher, channelName: string): Filter | undefined;
