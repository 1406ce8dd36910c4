import CLibvirt

/// A domain's state together with libvirt's reason for it.
public enum DomainState: Sendable, Hashable, CustomStringConvertible {
    case noState
    case running(RunningReason)
    case blocked
    case paused(PausedReason)
    case shuttingDown
    case shutoff(ShutoffReason)
    case crashed
    case pmSuspended

    /// Why a domain is running.
    public enum RunningReason: Int32, Sendable, Hashable {
        case unknown = 0, booted, migrated, restored, fromSnapshot, unpaused,
            migrationCanceled, saveCanceled, wakeup, crashed, postcopy, postcopyFailed
    }

    /// Why a domain is paused.
    public enum PausedReason: Int32, Sendable, Hashable {
        case unknown = 0, user, migration, save, dump, ioError, watchdog, fromSnapshot,
            shuttingDown, snapshot, crashed, starting, postcopy, postcopyFailed, apiError
    }

    /// Why a domain is shut off: the distinction between a guest that shut
    /// itself down, one that was destroyed, and one whose emulator died.
    public enum ShutoffReason: Int32, Sendable, Hashable {
        case unknown = 0, shutdown, destroyed, crashed, migrated, saved, failed, fromSnapshot, daemon
    }

    init(state: Int32, reason: Int32) {
        switch UInt32(state) {
        case VIR_DOMAIN_RUNNING.rawValue: self = .running(RunningReason(rawValue: reason) ?? .unknown)
        case VIR_DOMAIN_BLOCKED.rawValue: self = .blocked
        case VIR_DOMAIN_PAUSED.rawValue: self = .paused(PausedReason(rawValue: reason) ?? .unknown)
        case VIR_DOMAIN_SHUTDOWN.rawValue: self = .shuttingDown
        case VIR_DOMAIN_SHUTOFF.rawValue: self = .shutoff(ShutoffReason(rawValue: reason) ?? .unknown)
        case VIR_DOMAIN_CRASHED.rawValue: self = .crashed
        case VIR_DOMAIN_PMSUSPENDED.rawValue: self = .pmSuspended
        default: self = .noState
        }
    }

    /// True while the guest has an emulator process (running, paused, or
    /// crashed and preserved by `on_crash='preserve'`).
    public var isActive: Bool {
        switch self {
        case .shutoff, .noState: false
        default: true
        }
    }

    /// The state's name as `virsh domstate` prints it, e.g. `shut off`.
    public var name: String {
        switch self {
        case .noState: "no state"
        case .running: "running"
        case .blocked: "blocked"
        case .paused: "paused"
        case .shuttingDown: "in shutdown"
        case .shutoff: "shut off"
        case .crashed: "crashed"
        case .pmSuspended: "pmsuspended"
        }
    }

    /// The reason in words, e.g. `destroyed`; nil where libvirt gives none.
    public var reason: String? {
        switch self {
        case .running(let reason):
            switch reason {
            case .unknown: nil
            case .booted: "booted"
            case .migrated: "migrated"
            case .restored: "restored"
            case .fromSnapshot: "from snapshot"
            case .unpaused: "unpaused"
            case .migrationCanceled: "migration canceled"
            case .saveCanceled: "save canceled"
            case .wakeup: "event wakeup"
            case .crashed: "crashed"
            case .postcopy: "post-copy"
            case .postcopyFailed: "post-copy failed"
            }
        case .paused(let reason):
            switch reason {
            case .unknown: nil
            case .user: "user"
            case .migration: "migrating"
            case .save: "saving"
            case .dump: "dumping"
            case .ioError: "I/O error"
            case .watchdog: "watchdog"
            case .fromSnapshot: "from snapshot"
            case .shuttingDown: "shutting down"
            case .snapshot: "creating snapshot"
            case .crashed: "crashed"
            case .starting: "starting up"
            case .postcopy: "post-copy"
            case .postcopyFailed: "post-copy failed"
            case .apiError: "API error"
            }
        case .shutoff(let reason):
            switch reason {
            case .unknown: nil
            case .shutdown: "shutdown"
            case .destroyed: "destroyed"
            case .crashed: "crashed"
            case .migrated: "migrated"
            case .saved: "saved"
            case .failed: "failed"
            case .fromSnapshot: "from snapshot"
            case .daemon: "daemon"
            }
        default: nil
        }
    }

    /// `running (booted)`, `shut off (destroyed)`, ...
    public var description: String {
        reason.map { "\(name) (\($0))" } ?? name
    }
}
