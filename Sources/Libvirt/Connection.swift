import CLibvirt
import Foundation
import Synchronization

/// A connection to a libvirt driver (`qemu:///system`, `test:///default`,
/// `qemu+ssh://host/system`, ...).
///
/// Every call runs on the wrapper's own threads, never on Swift's
/// cooperative pool. When libvirtd goes away (restart, crash), the next call
/// opens a new connection, and subscribers of ``events()`` see
/// ``ConnectionEvent/disconnected(reason:)`` and later
/// ``ConnectionEvent/reconnected``, with callbacks registered again.
public final class Connection: Sendable {
    /// The URI this connection was opened with.
    public let uri: String
    /// Whether the connection is read-only.
    public let readOnly: Bool
    /// Keepalive: a ping every `interval` seconds, the connection is closed
    /// after `count` unanswered ones. Nil turns keepalive off.
    public let keepAlive: (interval: Int32, count: UInt32)?

    private struct State {
        var handle: ConnectionHandle?
        var generation = 0
        var subscribers: [Int: AsyncStream<ConnectionEvent>.Continuation] = [:]
        var nextSubscriber = 0
        var reconnecting = false
        var closed = false
    }

    private let state = Mutex(State())

    private init(uri: String, readOnly: Bool, keepAlive: (interval: Int32, count: UInt32)?) {
        self.uri = uri
        self.readOnly = readOnly
        self.keepAlive = keepAlive
    }

    /// Opens a connection. Throws a ``LibvirtError`` naming the URI when
    /// libvirt cannot be reached.
    public static func open(
        _ uri: String,
        readOnly: Bool = false,
        keepAlive: (interval: Int32, count: UInt32)? = (interval: 5, count: 3)
    ) async throws -> Connection {
        Runtime.ensureInitialized()
        let connection = Connection(uri: uri, readOnly: readOnly, keepAlive: keepAlive)
        _ = try await blocking { try connection.handle() }
        return connection
    }

    deinit {
        let subscribers = state.withLock { $0.subscribers.values }
        for subscriber in subscribers { subscriber.finish() }
    }

    /// Closes the connection. Later calls fail; event streams finish.
    public func close() async {
        let (handle, subscribers) = state.withLock { state in
            state.closed = true
            defer {
                state.handle = nil
                state.subscribers = [:]
            }
            return (state.handle, Array(state.subscribers.values))
        }
        for subscriber in subscribers { subscriber.finish() }
        // virConnectClose is an RPC: do it on a wrapper thread, not in a
        // deinit that could run anywhere.
        if let handle { _ = try? await blocking { handle.close() } }
    }

    /// Whether the current connection is open and alive (no RPC is made).
    public var isAlive: Bool {
        state.withLock { $0.handle?.isAlive ?? false }
    }

    // MARK: Handles

    /// The live handle, opening a new one when there is none or the current
    /// one died. Blocking: call only from ``blocking(_:)``.
    func handle() throws -> ConnectionHandle {
        let current: ConnectionHandle? = try state.withLock { state in
            guard !state.closed else {
                throw LibvirtError(operation: "use connection to \(uri)", code: .noConnect, message: "the connection was closed")
            }
            return state.handle
        }
        if let current, current.isAlive { return current }

        let pointer = readOnly ? virConnectOpenReadOnly(uri) : virConnectOpen(uri)
        guard let pointer else {
            throw LibvirtError.last("connect to libvirt at \(uri)")
        }
        let generation = state.withLock { state -> Int in
            state.generation += 1
            return state.generation
        }
        let fresh = ConnectionHandle(pointer: pointer, generation: generation, connection: self)
        if let keepAlive {
            // Fails harmlessly on drivers without keepalive (test:///, local).
            _ = virConnectSetKeepAlive(pointer, keepAlive.interval, keepAlive.count)
        }
        fresh.registerCloseCallback()

        enum Outcome { case installed(reconnect: Bool, subscribed: Bool), raced(ConnectionHandle) }
        // The replaced handle is returned rather than dropped under the
        // lock: its deinit makes libvirt calls.
        let (outcome, replaced): (Outcome, ConnectionHandle?) = state.withLock { state in
            if let other = state.handle, other !== current, other.isAlive {
                return (.raced(other), nil)
            }
            let replaced = state.handle
            state.handle = fresh
            let reconnect = replaced != nil || state.reconnecting
            return (.installed(reconnect: reconnect, subscribed: !state.subscribers.isEmpty), replaced)
        }
        replaced?.close()
        switch outcome {
        case .raced(let other):
            // Another thread reconnected first; use its handle, drop ours.
            return other
        case .installed(let reconnect, let subscribed):
            if subscribed {
                do {
                    try fresh.registerLifecycleCallback()
                } catch {
                    // Subscribers must not sit on a connection that never
                    // delivers events: the next call (or the reconnect
                    // loop) opens another one.
                    fresh.markDead()
                    throw error
                }
            }
            if reconnect { broadcast(.reconnected) }
            return fresh
        }
    }

    /// Runs `body` with the live connection pointer on a wrapper thread.
    @discardableResult
    func withPointer<T: Sendable>(_ body: @escaping @Sendable (OpaquePointer) throws -> T) async throws -> T {
        try await blocking {
            let handle = try self.handle()
            return try withExtendedLifetime(handle) { try body(handle.pointer) }
        }
    }

    // MARK: Events

    /// Domain lifecycle events and connection changes, from the moment this
    /// returns. The callback is registered before it returns, so nothing
    /// done afterwards is missed. Ending the iteration unsubscribes.
    public func events() async throws -> AsyncStream<ConnectionEvent> {
        let (stream, continuation) = AsyncStream.makeStream(
            of: ConnectionEvent.self, bufferingPolicy: .bufferingNewest(4096))
        let id = state.withLock { state in
            state.nextSubscriber += 1
            state.subscribers[state.nextSubscriber] = continuation
            return state.nextSubscriber
        }
        continuation.onTermination = { [weak self] _ in self?.unsubscribe(id) }
        do {
            try await blocking { try self.handle().registerLifecycleCallback() }
        } catch {
            unsubscribe(id)
            throw error
        }
        return stream
    }

    /// The lifecycle callback stays registered on the handle until the
    /// handle closes: events for no subscriber cost nothing, while
    /// deregistering here would race with a new subscriber registering.
    private func unsubscribe(_ id: Int) {
        _ = state.withLock { $0.subscribers.removeValue(forKey: id) }
    }

    func broadcast(_ event: ConnectionEvent) {
        let subscribers = state.withLock { Array($0.subscribers.values) }
        for subscriber in subscribers { subscriber.yield(event) }
    }

    /// Called on the event loop thread when libvirt closed a handle.
    func handleClosed(generation: Int, reason: String) {
        // A late callback from a handle already replaced says nothing new.
        let (current, shouldReconnect) = state.withLock { state -> (Bool, Bool) in
            guard state.handle?.generation == generation, !state.closed else { return (false, false) }
            state.handle?.markDead()
            guard !state.subscribers.isEmpty, !state.reconnecting else { return (true, false) }
            state.reconnecting = true
            return (true, true)
        }
        guard current else { return }
        broadcast(.disconnected(reason: reason))
        guard shouldReconnect else { return }
        Task { await self.reconnect() }
    }

    /// Reopens the connection for subscribers, with capped backoff.
    private func reconnect() async {
        var delay: Duration = .milliseconds(250)
        while true {
            let proceed = state.withLock { !$0.closed && !$0.subscribers.isEmpty }
            guard proceed else { break }
            if (try? await blocking({ try self.handle() })) != nil { break }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(5))
        }
        state.withLock { $0.reconnecting = false }
    }
}

/// One `virConnectPtr`, closed when the last reference goes.
///
/// `@unchecked Sendable`: libvirt connection objects may be used from any
/// thread concurrently; the mutable parts here are behind a Mutex.
///
/// No lock here or in ``Connection`` is held across a libvirt call that
/// talks to the daemon: when such a call finds the socket closed, libvirt
/// runs the close callback synchronously on the calling thread, and that
/// callback takes these locks.
final class ConnectionHandle: @unchecked Sendable {
    let pointer: OpaquePointer
    let generation: Int
    private let context: Unmanaged<CallbackContext>
    private let registration = Mutex<(lifecycle: Int32?, dead: Bool, closeCallback: Bool, closed: Bool)>(
        (nil, false, false, false))
    private let registering = NSLock()

    init(pointer: OpaquePointer, generation: Int, connection: Connection) {
        self.pointer = pointer
        self.generation = generation
        self.context = Unmanaged.passRetained(CallbackContext(connection: connection, generation: generation))
    }

    deinit {
        close()
        context.release()
    }

    /// Deregisters the callbacks and closes the connection, once. Makes
    /// RPCs: call it on a wrapper thread (deinit calls it as a last resort).
    func close() {
        let (lifecycle, closeCallback, wasClosed) = registration.withLock { registration in
            defer {
                registration.lifecycle = nil
                registration.closeCallback = false
                registration.closed = true
            }
            return (registration.lifecycle, registration.closeCallback, registration.closed)
        }
        guard !wasClosed else { return }
        if let lifecycle { virConnectDomainEventDeregisterAny(pointer, lifecycle) }
        if closeCallback { virConnectUnregisterCloseCallback(pointer, connectionClosedCallback) }
        virConnectClose(pointer)
    }

    var isAlive: Bool {
        !registration.withLock { $0.dead } && virConnectIsAlive(pointer) == 1
    }

    func markDead() { registration.withLock { $0.dead = true } }

    func registerCloseCallback() {
        // libvirt takes its own reference through the free callback.
        let opaque = context.retain().toOpaque()
        if virConnectRegisterCloseCallback(pointer, connectionClosedCallback, opaque, releaseContext) == 0 {
            registration.withLock { $0.closeCallback = true }
        } else {
            context.release()
        }
    }

    /// Registers the lifecycle callback unless it is registered already.
    func registerLifecycleCallback() throws {
        // Serialises registrations without holding `registration` across
        // the RPC (see the type's comment); the close callback never takes it.
        registering.lock()
        defer { registering.unlock() }
        guard registration.withLock({ $0.lifecycle == nil }) else { return }
        let opaque = context.retain().toOpaque()
        let id = corral_register_lifecycle_callback(pointer, lifecycleCallback, opaque, releaseContext)
        guard id >= 0 else {
            context.release()
            throw LibvirtError.last("register for domain events")
        }
        registration.withLock { $0.lifecycle = id }
    }

}

/// What libvirt hands back to the C callbacks.
final class CallbackContext: Sendable {
    weak let connection: Connection?
    let generation: Int

    init(connection: Connection, generation: Int) {
        self.connection = connection
        self.generation = generation
    }
}

private func context(_ opaque: UnsafeMutableRawPointer?) -> CallbackContext? {
    opaque.map { Unmanaged<CallbackContext>.fromOpaque($0).takeUnretainedValue() }
}

private let releaseContext: virFreeCallback = { opaque in
    if let opaque { Unmanaged<CallbackContext>.fromOpaque(opaque).release() }
}

private let lifecycleCallback: virConnectDomainEventCallback = { _, domain, event, detail, opaque in
    guard let domain, let connection = context(opaque)?.connection else { return 0 }
    let name = virDomainGetName(domain).map { String(cString: $0) } ?? ""
    let uuid = domainUUID(domain) ?? UUID(uuid: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    connection.broadcast(.domain(DomainEvent(name: name, uuid: uuid, event: event, detail: detail)))
    return 0
}

private let connectionClosedCallback: virConnectCloseFunc = { _, reason, opaque in
    guard let context = context(opaque), let connection = context.connection else { return }
    let words: String
    switch UInt32(reason) {
    case VIR_CONNECT_CLOSE_REASON_ERROR.rawValue: words = "connection error"
    case VIR_CONNECT_CLOSE_REASON_EOF.rawValue: words = "libvirt closed the connection"
    case VIR_CONNECT_CLOSE_REASON_KEEPALIVE.rawValue: words = "keepalive timed out"
    default: words = "connection closed"
    }
    connection.handleClosed(generation: context.generation, reason: words)
}

/// Reads a domain's UUID from its pointer (no RPC).
func domainUUID(_ domain: OpaquePointer) -> UUID? {
    var buffer = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
    guard virDomainGetUUIDString(domain, &buffer) == 0 else { return nil }
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return UUID(uuidString: String(decoding: bytes, as: UTF8.self))
}
