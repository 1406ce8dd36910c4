import CLibvirt
import Foundation

/// Something libvirt told the wrapper about a connection.
public enum ConnectionEvent: Sendable, Hashable {
    /// A domain's lifecycle changed.
    case domain(DomainEvent)
    /// The connection to libvirt closed (for example libvirtd restarted).
    /// Events are missed until ``reconnected``: re-read state then.
    case disconnected(reason: String)
    /// A new connection replaced a closed one; event callbacks are
    /// registered on it again.
    case reconnected
}

/// A domain lifecycle event.
public struct DomainEvent: Sendable, Hashable, CustomStringConvertible {
    /// The domain's name.
    public var name: String
    /// The domain's UUID.
    public var uuid: UUID
    /// What happened.
    public var kind: Kind

    /// What happened to the domain.
    public enum Kind: Sendable, Hashable {
        case defined
        case undefined
        case started
        case suspended
        case resumed
        /// The emulator stopped, and why.
        case stopped(StopReason)
        /// The guest began or finished shutting itself down.
        case shutdown
        case pmSuspended
        /// The guest crashed (panic device or watchdog).
        case crashed
        case other(event: Int32, detail: Int32)
    }

    /// Why a domain stopped.
    public enum StopReason: Int32, Sendable, Hashable {
        case shutdown = 0, destroyed, crashed, migrated, saved, failed, fromSnapshot
    }

    public init(name: String, uuid: UUID, kind: Kind) {
        self.name = name
        self.uuid = uuid
        self.kind = kind
    }

    init(name: String, uuid: UUID, event: Int32, detail: Int32) {
        let kind: Kind
        switch UInt32(event) {
        case VIR_DOMAIN_EVENT_DEFINED.rawValue: kind = .defined
        case VIR_DOMAIN_EVENT_UNDEFINED.rawValue: kind = .undefined
        case VIR_DOMAIN_EVENT_STARTED.rawValue: kind = .started
        case VIR_DOMAIN_EVENT_SUSPENDED.rawValue: kind = .suspended
        case VIR_DOMAIN_EVENT_RESUMED.rawValue: kind = .resumed
        case VIR_DOMAIN_EVENT_STOPPED.rawValue:
            kind = StopReason(rawValue: detail).map(Kind.stopped) ?? .other(event: event, detail: detail)
        case VIR_DOMAIN_EVENT_SHUTDOWN.rawValue: kind = .shutdown
        case VIR_DOMAIN_EVENT_PMSUSPENDED.rawValue: kind = .pmSuspended
        case VIR_DOMAIN_EVENT_CRASHED.rawValue: kind = .crashed
        default: kind = .other(event: event, detail: detail)
        }
        self.init(name: name, uuid: uuid, kind: kind)
    }

    public var description: String { "\(name): \(kind)" }
}
