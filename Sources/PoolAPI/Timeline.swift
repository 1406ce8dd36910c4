import Foundation

/// A step of an instance's launch, from the user's request to SSH.
public enum LaunchPhase: String, Codable, Sendable, CaseIterable, Comparable {
    /// The pool accepted the request (recorded by the pool).
    case requested
    /// The pool chose an appliance (recorded by the pool).
    case placed
    /// The agent applied the `start` action.
    case pickedUp = "picked-up"
    /// The image (and its kernel and initrd) are in the agent's cache.
    case imageReady = "image-ready"
    /// The instance's disk overlay and cloud-init seed are written.
    case seedWritten = "seed-written"
    /// libvirt accepted the domain definition.
    case domainDefined = "domain-defined"
    /// libvirt started the domain.
    case domainStarted = "domain-started"
    /// The pool received the first report of the instance running.
    case runningReported = "running-reported"
    /// cloud-init finished in the guest, the post-create part included;
    /// the guest says so on its serial console.
    case postCreateDone = "post-create-done"
    /// The guest's SSH server answered (with its `SSH-` greeting).
    case sshReachable = "ssh-reachable"

    /// The phases the pool records itself; an agent's times for them are not taken.
    public static let recordedByPool: Set<LaunchPhase> = [.requested, .placed, .runningReported]

    public static func < (lhs: LaunchPhase, rhs: LaunchPhase) -> Bool {
        allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)!
    }
}

/// When an instance reached one launch phase; entries sort by time (then
/// by phase, for two at the same millisecond).
public struct TimelineEntry: Codable, Sendable, Equatable, Comparable {
    public var phase: LaunchPhase
    /// Unix seconds, to the millisecond.
    public var at: Double
    /// What else is worth knowing, e.g. that the post-create script failed.
    public var detail: String?

    public init(phase: LaunchPhase, at date: Date, detail: String? = nil) {
        self.phase = phase
        self.at = (date.timeIntervalSince1970 * 1000).rounded() / 1000
        self.detail = detail
    }

    public var date: Date { Date(timeIntervalSince1970: at) }

    public static func < (lhs: TimelineEntry, rhs: TimelineEntry) -> Bool { (lhs.at, lhs.phase) < (rhs.at, rhs.phase) }
}

/// Where a guest's SSH server is reached: the detail of the `ssh-reachable`
/// phase (written `HOST port PORT`, where its appliance's probe reached it),
/// and the `ssh` of a report and of the server-instance object (where users
/// reach it: `{"host": ..., "port": ...}`).
public struct SSHEndpoint: Codable, Sendable, Equatable {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Reads an `ssh-reachable` detail; nil for anything else.
    public init?(detail: String) {
        let words = detail.split(separator: " ", omittingEmptySubsequences: false)
        guard words.count == 3, words[1] == "port", !words[0].isEmpty, let port = Int(words[2]), (1...65535).contains(port)
        else { return nil }
        self.init(host: String(words[0]), port: port)
    }

    /// The `ssh-reachable` detail: `HOST port PORT`.
    public var detail: String { "\(host) port \(port)" }
}
