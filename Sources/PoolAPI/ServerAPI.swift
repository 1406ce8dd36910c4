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

    enum CodingKeys: String, CodingKey, CaseIterable {
        case serverImage = "server-image"
        case serverFlavor = "server-flavor"
        case serverTemplate = "server-template"
        case users
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

        enum CodingKeys: String, CodingKey, CaseIterable { case what, how, users, seconds }

        public init(what: String, how: String? = nil, users: [String]? = nil, seconds: Int? = nil) {
            self.what = what
            self.how = how
            self.users = users
            self.seconds = seconds
        }
    }

    public var task: Task

    enum CodingKeys: String, CodingKey, CaseIterable { case task }

    public init(_ task: Task) { self.task = task }
}

/// The body of `POST /v1/ssh-key`.
public struct ServerSSHKeyCreation: Codable, Sendable, Equatable {
    public var name: String
    public var publicKey: String

    enum CodingKeys: String, CodingKey, CaseIterable {
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

/// The body of `PUT /v1/server-flavor/ID` and `PUT /v1/server-image/ID`.
public struct ServerCatalogueChange: Codable, Sendable, Equatable {
    public var active: Bool

    enum CodingKeys: String, CodingKey, CaseIterable { case active }

    public init(active: Bool) { self.active = active }
}

/// The body of `PUT /v1/user/NAME`: the fields given change.
public struct ServerUserChange: Codable, Sendable, Equatable {
    public var enabled: Bool?
    public var maxInstances: Int?
    /// `.some(nil)` (JSON `null`): back to the pool's default lease.
    public var leaseSeconds: Int??

    enum CodingKeys: String, CodingKey, CaseIterable {
        case enabled
        case maxInstances = "max-instances"
        case leaseSeconds = "lease-seconds"
    }

    public init(enabled: Bool? = nil, maxInstances: Int? = nil, leaseSeconds: Int?? = nil) {
        self.enabled = enabled
        self.maxInstances = maxInstances
        self.leaseSeconds = leaseSeconds
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        enabled = try container.decodeIfPresent(Bool.self, forKey: .enabled)
        maxInstances = try container.decodeIfPresent(Int.self, forKey: .maxInstances)
        if container.contains(.leaseSeconds) {
            leaseSeconds = .some(try container.decodeNil(forKey: .leaseSeconds) ? nil : try container.decode(Int.self, forKey: .leaseSeconds))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encodeIfPresent(enabled, forKey: .enabled)
        try container.encodeIfPresent(maxInstances, forKey: .maxInstances)
        if let leaseSeconds {
            if let seconds = leaseSeconds { try container.encode(seconds, forKey: .leaseSeconds) } else { try container.encodeNil(forKey: .leaseSeconds) }
        }
    }
}

/// A request body whose every field is known: the pool refuses any other
/// field by name (the schemas' `additionalProperties: false`).
public protocol StrictRequestBody: Decodable {
    /// The JSON names of its fields.
    static var fieldNames: [String] { get }
    /// The fields that hold objects, with their types.
    static var objectFields: [String: any StrictRequestBody.Type] { get }
    /// The fields whose JSON `null` means something; any other is refused.
    static var nullableFields: [String] { get }
}

extension StrictRequestBody {
    public static var objectFields: [String: any StrictRequestBody.Type] { [:] }
    public static var nullableFields: [String] { [] }
}

extension ServerInstanceCreation: StrictRequestBody {
    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
}

extension ServerInstanceChange: StrictRequestBody {
    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
    public static var objectFields: [String: any StrictRequestBody.Type] { ["task": Task.self] }
}

extension ServerInstanceChange.Task: StrictRequestBody {
    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
}

extension ServerSSHKeyCreation: StrictRequestBody {
    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
}

extension ServerCatalogueChange: StrictRequestBody {
    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
}

extension ServerUserChange: StrictRequestBody {
    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
    public static var nullableFields: [String] { [CodingKeys.leaseSeconds.stringValue] }
}

/// A template as `GET /v1/server-template` shows it: instances made from
/// it boot its wisp on its flavor, handed out at once from its warm pool
/// of `hot-starts` instances when one is ready. Its id is its name.
public struct ServerTemplate: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var wisp: String
    public var serverFlavor: String
    public var hotStarts: Int

    enum CodingKeys: String, CodingKey {
        case id, name, wisp
        case serverFlavor = "server-flavor"
        case hotStarts = "hot-starts"
    }

    public init(name: String, wisp: String, serverFlavor: String, hotStarts: Int) {
        id = name
        self.name = name
        self.wisp = wisp
        self.serverFlavor = serverFlavor
        self.hotStarts = hotStarts
    }
}

/// The body of `PUT /v1/server-template/ID`: the fields given change.
public struct ServerTemplateChange: Codable, Sendable, Equatable, StrictRequestBody {
    public var wisp: String?
    public var serverFlavor: String?
    public var hotStarts: Int?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case wisp
        case serverFlavor = "server-flavor"
        case hotStarts = "hot-starts"
    }

    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }

    public init(wisp: String? = nil, serverFlavor: String? = nil, hotStarts: Int? = nil) {
        self.wisp = wisp
        self.serverFlavor = serverFlavor
        self.hotStarts = hotStarts
    }
}

/// A wisp as superusers see it (`GET /v1/wisp`): what an instance boots,
/// a catalogue image or an image URL, with SSH keys, a post-creation
/// script or cloud-config, and a callback. Its id is its name.
public struct ServerWisp: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var owner: String
    public var serverImage: String?
    public var dynamicImageURL: String?
    public var sshKeys: [String]
    public var postCreate: String
    public var callbackURL: String?

    enum CodingKeys: String, CodingKey {
        case id, name, owner
        case serverImage = "server-image"
        case dynamicImageURL = "dynamic-image-url"
        case sshKeys = "ssh-keys"
        case postCreate = "post-create"
        case callbackURL = "callback-url"
    }

    public init(
        name: String, owner: String, serverImage: String?, dynamicImageURL: String?, sshKeys: [String], postCreate: String, callbackURL: String?
    ) {
        id = name
        self.name = name
        self.owner = owner
        self.serverImage = serverImage
        self.dynamicImageURL = dynamicImageURL
        self.sshKeys = sshKeys
        self.postCreate = postCreate
        self.callbackURL = callbackURL
    }
}

/// The body of `PUT /v1/wisp/ID`: the fields given change; a
/// `server-image` replaces a `dynamic-image-url` and the other way round;
/// `callback-url: null` removes the callback, `post-create: ""` the script.
public struct ServerWispChange: Codable, Sendable, Equatable, StrictRequestBody {
    public var serverImage: String?
    public var dynamicImageURL: String?
    public var sshKeys: [String]?
    public var postCreate: String?
    public var callbackURL: String??

    enum CodingKeys: String, CodingKey, CaseIterable {
        case serverImage = "server-image"
        case dynamicImageURL = "dynamic-image-url"
        case sshKeys = "ssh-keys"
        case postCreate = "post-create"
        case callbackURL = "callback-url"
    }

    public static var fieldNames: [String] { CodingKeys.allCases.map(\.stringValue) }
    public static var nullableFields: [String] { [CodingKeys.callbackURL.stringValue] }

    public init(
        serverImage: String? = nil, dynamicImageURL: String? = nil, sshKeys: [String]? = nil, postCreate: String? = nil,
        callbackURL: String?? = nil
    ) {
        self.serverImage = serverImage
        self.dynamicImageURL = dynamicImageURL
        self.sshKeys = sshKeys
        self.postCreate = postCreate
        self.callbackURL = callbackURL
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        serverImage = try container.decodeIfPresent(String.self, forKey: .serverImage)
        dynamicImageURL = try container.decodeIfPresent(String.self, forKey: .dynamicImageURL)
        sshKeys = try container.decodeIfPresent([String].self, forKey: .sshKeys)
        postCreate = try container.decodeIfPresent(String.self, forKey: .postCreate)
        if container.contains(.callbackURL) {
            callbackURL = .some(try container.decodeNil(forKey: .callbackURL) ? nil : try container.decode(String.self, forKey: .callbackURL))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encodeIfPresent(serverImage, forKey: .serverImage)
        try container.encodeIfPresent(dynamicImageURL, forKey: .dynamicImageURL)
        try container.encodeIfPresent(sshKeys, forKey: .sshKeys)
        try container.encodeIfPresent(postCreate, forKey: .postCreate)
        if let callbackURL {
            if let url = callbackURL { try container.encode(url, forKey: .callbackURL) } else { try container.encodeNil(forKey: .callbackURL) }
        }
    }
}
