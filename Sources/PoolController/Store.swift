import Foundation
import PoolAPI

/// A user of the pool.
public struct User: Sendable, Equatable, Codable {
    public var name: String
    public var superuser: Bool
    /// How many instances the user may hold at once.
    public var maxInstances: Int
    public var createdAt: Date
}

/// A compute appliance (a libvirt host running the agent).
public struct Appliance: Sendable, Equatable, Codable {
    public var name: String
    /// The owning user's name.
    public var owner: String
    /// A disabled appliance is refused (409) and gets no work.
    public var enabled: Bool
    public var version: String?
    public var latitude: Double?
    public var longitude: Double?
    public var dynamicImages: Bool
    /// When it last authorized or checked in.
    public var lastSeen: Date?
    public var createdAt: Date
}

/// A boot image the pool offers.
public struct Image: Sendable, Equatable, Codable {
    public var name: String
    public var url: String
    /// Hex SHA-256 of the file, checked by the agent when present.
    public var sha256: String?
    /// `qcow2` or `raw`.
    public var diskFormat: String

    public init(name: String, url: String, sha256: String? = nil, diskFormat: String = "qcow2") {
        self.name = name
        self.url = url
        self.sha256 = sha256
        self.diskFormat = diskFormat
    }
}

/// A boot template: the image, SSH keys, post-creation script and callback
/// an instance starts with.
public struct Wisp: Sendable, Equatable, Codable {
    public var name: String
    /// The owning user's name.
    public var owner: String
    /// A catalogue image by name, or else...
    public var image: String?
    /// ...an image fetched from this URL by the appliance.
    public var dynamicImageURL: String?
    public var sshKeys: [String]
    /// The post-creation script or cloud-config, as written.
    public var postCreate: String
    public var callbackURL: String?
    /// The owner's default wisp.
    public var isDefault: Bool
    /// The pool's fallback for users without a default.
    public var isSystemDefault: Bool

    public init(
        name: String, owner: String, image: String? = nil, dynamicImageURL: String? = nil, sshKeys: [String] = [],
        postCreate: String = "", callbackURL: String? = nil, isDefault: Bool = false, isSystemDefault: Bool = false
    ) {
        self.name = name
        self.owner = owner
        self.image = image
        self.dynamicImageURL = dynamicImageURL
        self.sshKeys = sshKeys
        self.postCreate = postCreate
        self.callbackURL = callbackURL
        self.isDefault = isDefault
        self.isSystemDefault = isSystemDefault
    }
}

/// The pool's record of an instance on an appliance.
public struct Instance: Sendable, Equatable, Codable {
    public var name: String
    /// The appliance it runs on (the first to report it).
    public var appliance: String
    /// The user it belongs to.
    public var owner: String
    /// The wisp it boots from; nil: its owner's default, else the system's.
    public var wisp: String?
    public var state: InstanceState
    public var flavor: InstanceFlavor?
    public var ask: Int?
    public var expires: Date?
    public var address: String?
    public var ipAddresses: [IPAddress]
    /// The newest console lines, at most the pool's limit.
    public var consoleTail: [String]
    public var updatedAt: Date
}

/// The pool's storage. One implementation per backend (SQLite now); the
/// HTTP routes and the admin commands see only this protocol.
public protocol PoolStore: Sendable {
    /// Creates a user whose token has the given digest.
    func addUser(name: String, superuser: Bool, maxInstances: Int, tokenDigest: String) async throws -> User
    func users() async throws -> [User]

    /// Creates an appliance owned by an existing user.
    func addAppliance(name: String, owner: String, tokenDigest: String) async throws -> Appliance
    func appliances() async throws -> [Appliance]
    /// Enables or disables an appliance.
    func setAppliance(_ name: String, enabled: Bool) async throws -> Appliance
    /// Replaces an appliance's token; the old one stops working at once.
    func setApplianceToken(_ name: String, tokenDigest: String) async throws
    /// The appliance whose token has this digest.
    func appliance(tokenDigest: String) async throws -> Appliance?
    /// Records what an appliance said about itself, and that it was seen.
    func recordCheckIn(_ name: String, block: ApplianceBlock, at date: Date) async throws -> Appliance

    func addFlavor(_ flavor: Flavor) async throws
    func flavors() async throws -> [Flavor]

    func addImage(_ image: Image) async throws
    func images() async throws -> [Image]

    /// Adds a wisp. Its owner and image must exist; a default replaces the
    /// owner's previous default, a system default the previous one.
    func addWisp(_ wisp: Wisp) async throws
    func wisps() async throws -> [Wisp]

    /// Records an appliance's report of an instance, creating the record on
    /// the first report. An instance belongs to the appliance that first
    /// reported it: another appliance gets ``PoolError/forbidden(_:)`` and
    /// changes nothing. Keeps the newest `consoleLimit` console lines.
    func recordReport(_ report: InstanceReport, appliance: String, consoleLimit: Int, at date: Date) async throws
        -> Instance
    /// How to boot the instance: its wisp, else its owner's default wisp,
    /// else the system default.
    func startParameters(forInstance name: String) async throws -> StartParameters
    func instances() async throws -> [Instance]
}
