import Foundation
import PoolAPI

/// The reply envelope of the user-facing API (`/v1/...`), as the
/// server-instance API document gives it: `{"data": ..., "msg": "",
/// "success": true}`. A refusal has `data: null`, the reason in `msg`.
public struct ServerEnvelope<Data: Codable & Sendable>: Codable, Sendable {
    public var data: Data?
    public var msg: String
    public var success: Bool

    public init(data: Data?, msg: String = "", success: Bool = true) {
        self.data = data
        self.msg = msg
        self.success = success
    }

    enum CodingKeys: String, CodingKey { case data, msg, success }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(data, forKey: .data)  // null on refusals, as written
        try container.encode(msg, forKey: .msg)
        try container.encode(success, forKey: .success)
    }
}

/// A server-instance as the user-facing API shows it. Optional fields
/// are left out when empty.
public struct ServerInstance: Codable, Sendable, Equatable {
    public var id: String
    public var cloudauthID: String
    public var users: [String]
    public var serverImage: String
    public var serverFlavor: String
    public var creationDate: String
    public var status: String
    public var hostname: String?
    public var publicIP: String?
    public var privateIP: String?
    /// Why the instance is `ERROR` (a Corral addition): the build, boot or
    /// power failure its appliance reported, or the pool's own refusal.
    public var lastError: String?
    /// Where to reach its SSH server (a Corral addition), as its appliance
    /// reports it, and the user to log in as: `{"host": ..., "port": ...,
    /// "user": ...}`; left out until it runs.
    public var ssh: ServerSSHEndpoint?

    enum CodingKeys: String, CodingKey {
        case id, users, status, hostname, ssh
        case lastError = "last-error"
        case cloudauthID = "cloudauth-id"
        case serverImage = "server-image"
        case serverFlavor = "server-flavor"
        case creationDate = "creation-date"
        case publicIP = "public-ip"
        case privateIP = "private-ip"
    }

    public init(_ instance: Instance) {
        id = instance.id
        cloudauthID = instance.ownerID
        users = instance.users
        serverImage = instance.image ?? ""
        serverFlavor = instance.flavor?.name ?? ""
        creationDate = Self.timestamp(instance.createdAt)
        status = Self.status(of: instance)
        hostname = instance.name
        func address(_ scope: String) -> String? {
            let matching = instance.ipAddresses.filter { $0.scope == scope }
            return (matching.first { $0.version == 4 } ?? matching.first)?.address
        }
        publicIP = address("public")
        privateIP = address("private")
        lastError = instance.lastError
        ssh = instance.state == .decommissioned
            ? nil : instance.ssh.map { ServerSSHEndpoint(host: $0.host, port: $0.port, user: instance.loginUser) }
    }

    /// RFC 3339 in UTC to the second, as in the API document's examples.
    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
    }

    /// The API document's word for an instance's state:
    ///
    /// | Corral                                      | status      |
    /// |---------------------------------------------|-------------|
    /// | 7 decommissioned                            | `DELETED`   |
    /// | an error reported (build, boot, power)      | `ERROR`     |
    /// | 2 leased, 3 starting; a warm hand-out whose  | `BUILD`     |
    /// |   new owner's keys are not yet in the guest  |             |
    /// | 1 on offer, 4 running                       | `ACTIVE`    |
    /// | 5 or 6 with reason "shut off ...", 0 inactive | `SHUTOFF` |
    /// | 5 or 6 otherwise (paused: lease ended, ...)  | `SUSPENDED` |
    public static func status(of instance: Instance) -> String {
        if instance.state == .decommissioned { return "DELETED" }
        if instance.lastError != nil { return "ERROR" }
        // A warm instance stays BUILD to its new owner until its keys are theirs.
        if instance.rekeying { return "BUILD" }
        switch instance.state {
        case .leased, .starting: return "BUILD"
        case .onOffer, .running: return "ACTIVE"
        case .inactive: return "SHUTOFF"
        case .suspended, .leasedWhileSuspended:
            return instance.stateReason?.hasPrefix("shut off") == true ? "SHUTOFF" : "SUSPENDED"
        case .decommissioned: return "DELETED"
        }
    }
}

/// Where and as whom to log into an instance over SSH.
public struct ServerSSHEndpoint: Codable, Sendable, Equatable {
    public var host: String
    public var port: Int
    /// The guest user holding the instance's keys (its image's login user);
    /// left out when the image names none.
    public var user: String?

    public init(host: String, port: Int, user: String? = nil) {
        self.host = host
        self.port = port
        self.user = user
    }
}

/// A flavor as `GET /v1/server-flavor` shows it; its id is its name.
public struct ServerFlavor: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var description: String
    public var vcpus: Int
    public var memoryMiB: Int
    public var diskGiB: Int

    enum CodingKeys: String, CodingKey {
        case id, name, description, vcpus
        case memoryMiB = "memory-mib"
        case diskGiB = "disk-gib"
    }

    init(_ flavor: Flavor) {
        id = flavor.name
        name = flavor.name
        description = flavor.description
        vcpus = flavor.vcpus
        memoryMiB = flavor.memory
        diskGiB = flavor.disk
    }
}

/// An image as `GET /v1/server-image` shows it; its id is its name.
public struct ServerImage: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var diskFormat: String

    enum CodingKeys: String, CodingKey {
        case id, name
        case diskFormat = "disk-format"
    }

    init(_ image: Image) {
        id = image.name
        name = image.name
        diskFormat = image.diskFormat
    }
}

/// One phase of an instance's launch as the user-facing API shows it
/// (`GET /v1/server-instance/ID/timeline`, a Corral addition).
public struct ServerTimelineEntry: Codable, Sendable, Equatable {
    public var phase: String
    /// RFC 3339 UTC, to the millisecond.
    public var at: String
    /// Seconds since the request (since the first phase recorded, if the
    /// request was not), to the millisecond.
    public var seconds: Double
    public var detail: String?

    public init(phase: String, at: String, seconds: Double, detail: String? = nil) {
        self.phase = phase
        self.at = at
        self.seconds = seconds
        self.detail = detail
    }

    /// The entries of a timeline, timed from its request.
    public static func entries(_ timeline: [TimelineEntry]) -> [ServerTimelineEntry] {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        let start = (timeline.first { $0.phase == .requested } ?? timeline.first)?.at ?? 0
        return timeline.map { entry in
            ServerTimelineEntry(
                phase: entry.phase.rawValue, at: formatter.string(from: entry.date), seconds: ((entry.at - start) * 1000).rounded() / 1000,
                detail: entry.detail)
        }
    }
}
