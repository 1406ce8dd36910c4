import Foundation

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

    public init(
        id: String, cloudauthID: String, users: [String], serverImage: String, serverFlavor: String, creationDate: String,
        status: String, hostname: String? = nil, publicIP: String? = nil, privateIP: String? = nil, lastError: String? = nil,
        ssh: ServerSSHEndpoint? = nil
    ) {
        self.id = id
        self.cloudauthID = cloudauthID
        self.users = users
        self.serverImage = serverImage
        self.serverFlavor = serverFlavor
        self.creationDate = creationDate
        self.status = status
        self.hostname = hostname
        self.publicIP = publicIP
        self.privateIP = privateIP
        self.lastError = lastError
        self.ssh = ssh
    }

    /// RFC 3339 in UTC to the second, as in the API document's examples.
    public static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
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

    public init(id: String, name: String, description: String, vcpus: Int, memoryMiB: Int, diskGiB: Int) {
        self.id = id
        self.name = name
        self.description = description
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.diskGiB = diskGiB
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

    public init(id: String, name: String, diskFormat: String) {
        self.id = id
        self.name = name
        self.diskFormat = diskFormat
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

/// The body of `POST /v1/server-instance`: an image and a flavor, or a
/// template. Fields left nil are left out.
public struct ServerInstanceCreation: Codable, Sendable, Equatable {
    public var serverImage: String?
    public var serverFlavor: String?
    public var serverTemplate: String?
    public var users: [String]?
    public var sshKeys: [String]?
    public var userData: String?

    enum CodingKeys: String, CodingKey {
        case users
        case serverImage = "server-image"
        case serverFlavor = "server-flavor"
        case serverTemplate = "server-template"
        case sshKeys = "ssh-keys"
        case userData = "user-data"
    }

    public init(
        serverImage: String? = nil, serverFlavor: String? = nil, serverTemplate: String? = nil, users: [String]? = nil,
        sshKeys: [String]? = nil, userData: String? = nil
    ) {
        self.serverImage = serverImage
        self.serverFlavor = serverFlavor
        self.serverTemplate = serverTemplate
        self.users = users
        self.sshKeys = sshKeys
        self.userData = userData
    }
}

/// The body of `PUT /v1/server-instance/ID`: `{"task": {...}}`.
public struct ServerInstanceChange: Codable, Sendable, Equatable {
    public struct Task: Codable, Sendable, Equatable {
        /// `modify-users`, `reboot`, `power-on`, `power-off` or `extend-lease`.
        public var what: String
        /// For `modify-users`: `add`, `replace` or `delete`.
        public var how: String?
        public var users: [String]?
        /// For `extend-lease`.
        public var seconds: Int?

        public init(what: String, how: String? = nil, users: [String]? = nil, seconds: Int? = nil) {
            self.what = what
            self.how = how
            self.users = users
            self.seconds = seconds
        }
    }

    public var task: Task

    public init(_ task: Task) { self.task = task }
}

/// The body of `POST /v1/ssh-key`.
public struct ServerSSHKeyCreation: Codable, Sendable, Equatable {
    public var name: String
    public var publicKey: String

    enum CodingKeys: String, CodingKey {
        case name
        case publicKey = "public-key"
    }

    public init(name: String, publicKey: String) {
        self.name = name
        self.publicKey = publicKey
    }
}

/// A flavor or image after a superuser's change (`PUT /v1/server-flavor/ID`,
/// `PUT /v1/server-image/ID`).
public struct CatalogueEntry: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var active: Bool

    public init(name: String, active: Bool) {
        id = name
        self.name = name
        self.active = active
    }
}
