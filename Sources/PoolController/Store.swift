import Foundation
import PoolAPI

/// One of a user's SSH public keys (`/v1/ssh-key`).
public struct SSHKey: Sendable, Equatable, Codable {
    /// 32 hex digits.
    public var id: String
    public var name: String
    /// The OpenSSH public key line, as installed in the guest.
    public var publicKey: String
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    public var fingerprint: String
    public var createdAt: Date

    public init(id: String, name: String, publicKey: String, fingerprint: String, createdAt: Date) {
        self.id = id
        self.name = name
        self.publicKey = publicKey
        self.fingerprint = fingerprint
        self.createdAt = createdAt
    }
}

/// A user of the pool.
public struct User: Sendable, Equatable, Codable {
    /// The user's id in the user-facing API (`cloudauth-id`): 32 hex digits.
    public var id: String
    public var name: String
    public var superuser: Bool
    /// How many instances the user may hold at once.
    public var maxInstances: Int
    /// The user who manages this one (sees and changes their instances).
    public var manager: String?
    /// How long this user's new instances are leased for (nil: the pool's default).
    public var leaseSeconds: Int?
    public var createdAt: Date
    /// A disabled user's token is refused everywhere (401).
    public var enabled: Bool = true

    /// The refusal a disabled user's token gets.
    public static func refusalOfDisabled(_ name: String) -> String {
        "user '\(name)' is disabled; an admin can enable it (corral pool user enable \(name))"
    }
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
    /// Where it is, for placements that ask for a region (nil: no region).
    public var region: String?
    /// When it last authorized or checked in.
    public var lastSeen: Date?
    /// What its hypervisor had at its last check-in.
    public var stats: HypervisorStats?
    public var createdAt: Date

    /// Whether it has been silent too long for new placements.
    public func isStale(at date: Date, after seconds: Int) -> Bool {
        guard let lastSeen else { return true }
        return date.timeIntervalSince(lastSeen) > TimeInterval(seconds)
    }

    /// How long a recorded `lastSeen` (or an instance's `reportedAt`)
    /// stands for "now": a call within it that changes nothing else writes
    /// nothing.
    public static let seenRefreshSeconds: TimeInterval = 5

    /// Whether `seen` is recent enough not to be written again.
    public static func isFresh(_ seen: Date?, at date: Date) -> Bool {
        guard let seen else { return false }
        return date.timeIntervalSince(seen) < seenRefreshSeconds
    }

    /// Whether an authorization with `block` would change this record: a
    /// new version, place or image setting, or a `lastSeen` no longer fresh.
    public func changes(with block: ApplianceBlock, at date: Date) -> Bool {
        !Self.isFresh(lastSeen, at: date) || block.version.map({ $0 != version }) ?? false
            || block.latitude.map({ $0 != latitude }) ?? false || block.longitude.map({ $0 != longitude }) ?? false
            || block.dynamicimages.map({ $0 != dynamicImages }) ?? false
    }
}

/// A boot image the pool offers.
public struct Image: Sendable, Equatable, Codable {
    public var name: String
    public var url: String
    /// Hex SHA-256 of the file, checked by the agent when present.
    public var sha256: String?
    /// `qcow2` or `raw`.
    public var diskFormat: String
    /// For a root file system without a boot loader: the kernel, initrd
    /// and command line to boot it with.
    public var kernelBoot: KernelBoot?
    /// The guest user cloud-init gives instances' SSH keys to (`debian` in
    /// Debian's cloud images); nil: unknown, so the keys of running guests
    /// are not changed and the API names no user to log in as.
    public var loginUser: String?
    /// Whether new instances may use it; deactivating it keeps running ones.
    public var active: Bool

    public init(
        name: String, url: String, sha256: String? = nil, diskFormat: String = "qcow2", kernelBoot: KernelBoot? = nil,
        loginUser: String? = nil, active: Bool = true
    ) {
        self.name = name
        self.url = url
        self.sha256 = sha256
        self.diskFormat = diskFormat
        self.kernelBoot = kernelBoot
        self.loginUser = loginUser
        self.active = active
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
    /// Its id in the user-facing API: 32 hex digits.
    public var id: String
    /// Its name on the appliance (and its hostname).
    public var name: String
    /// The appliance it runs on (the first to report it).
    public var appliance: String
    /// The user it belongs to.
    public var owner: String
    /// The id of the user it belongs to.
    public var ownerID: String
    /// The ids of the users with access to it, its owner first.
    public var users: [String]
    /// The wisp it boots from; nil: its owner's default, else the system's.
    public var wisp: String?
    /// The catalogue image it boots (its own, else its wisp's).
    public var image: String?
    /// The template it was started from.
    public var template: String?
    /// Kept booted for its template, not yet handed to a user.
    public var warm: Bool
    /// Whether it may be reclaimed (the token launch API's `preemptible`).
    public var preemptible: Bool
    /// A label from the token launch API.
    public var topic: String?
    public var state: InstanceState
    public var flavor: InstanceFlavor?
    public var ask: Int?
    public var expires: Date?
    public var address: String?
    public var ipAddresses: [IPAddress]
    /// The newest console lines, at most the pool's limit.
    public var consoleTail: [String]
    /// Where its appliance says users reach its SSH server.
    public var ssh: SSHEndpoint?
    /// The guest user its SSH keys belong to (its image's login user).
    public var loginUser: String?
    /// A warm instance handed to a new owner whose keys its appliance has
    /// not yet reported installed.
    public var rekeying: Bool = false
    /// Where the pool fetches its start parameters (from a reservation).
    public var callbackURL: String?
    /// Why it failed, as its appliance reported (a build step, the boot),
    /// or why the pool could not give it start parameters.
    public var lastError: String?
    /// The hypervisor's reason for its state, e.g. `shut off (shutdown)`.
    public var stateReason: String?
    /// When its appliance last reported it (nil: placed, not yet reported).
    public var reportedAt: Date?
    public var createdAt: Date
    public var updatedAt: Date

    /// The event announcing its current state.
    public var event: InstanceEvent { InstanceEvent(name: name, state: state, appliance: appliance, owner: owner) }
}

/// A change to a wisp: nil leaves a part as it is. An image replaces a
/// dynamic image URL and the other way round.
public struct WispChange: Sendable, Equatable {
    public var image: String?
    public var dynamicImageURL: String?
    public var sshKeys: [String]?
    public var postCreate: String?
    /// `.some(nil)`: no callback from now on.
    public var callbackURL: String??

    public init(
        image: String? = nil, dynamicImageURL: String? = nil, sshKeys: [String]? = nil, postCreate: String? = nil, callbackURL: String?? = nil
    ) {
        self.image = image
        self.dynamicImageURL = dynamicImageURL
        self.sshKeys = sshKeys
        self.postCreate = postCreate
        self.callbackURL = callbackURL
    }

    public var isEmpty: Bool { self == WispChange() }
}

/// A template (the original system's "stream"): a wisp and a flavor, with a warm
/// pool of `hotStarts` booted instances waiting to be handed out.
public struct Template: Sendable, Equatable, Codable {
    /// The most warm instances a template may keep.
    public static let maxHotStarts = 100

    public var name: String
    public var wisp: String
    public var flavor: String
    public var hotStarts: Int
    /// The wisp's owner, who owns the warm instances until they are handed out.
    public var owner: String

    public init(name: String, wisp: String, flavor: String, hotStarts: Int = 0, owner: String = "") {
        self.name = name
        self.wisp = wisp
        self.flavor = flavor
        self.hotStarts = hotStarts
        self.owner = owner
    }
}

/// A user's request for a new instance: a flavor with an image, or a
/// template (its wisp and flavor, a warm instance when one is ready).
public struct InstanceRequest: Sendable, Equatable {
    /// The user who will own it.
    public var owner: String
    public var flavor: String?
    public var image: String?
    public var template: String?
    /// More users given access (ids or names); the owner always has it.
    public var users: [String] = []
    /// Only appliances in this region (nil: any).
    public var region: String?
    public var preemptible: Bool = true
    public var topic: String?
    /// The owner's keys to install, by id or name; nil: all of them.
    public var sshKeys: [String]?
    /// A `#cloud-config` document or a `#!` script, run after the wisp's part.
    public var userData: String?
    /// Refuse the create when no SSH key would reach the VM (the user-facing
    /// API; a wisp with a callback is taken to supply its own).
    public var requireSSHKey = false

    public init(owner: String, flavor: String? = nil, image: String? = nil, template: String? = nil, users: [String] = []) {
        self.owner = owner
        self.flavor = flavor
        self.image = image
        self.template = template
        self.users = users
    }
}

/// How a change to an instance's users applies its list.
public enum UsersChange: String, Sendable, CaseIterable {
    case add, replace, delete
}

/// What one warm-pool pass did.
public struct WarmPoolPass: Sendable, Equatable {
    /// Warm instances placed to fill their templates' pools.
    public var started: [Instance] = []
    /// Warm instances past their age, now being decommissioned.
    public var retired: [String] = []
    /// Warm instances that failed or stopped, now being decommissioned.
    public var dropped: [String] = []
    /// Templates that could not be filled, and why.
    public var shortfalls: [String] = []

    public init() {}
}

/// Where an instance's start parameters come from.
public enum BootSource: Sendable, Equatable {
    /// From its wisp (or its owner's default, or the system default).
    case parameters(StartParameters)
    /// From a callback URL the pool fetches.
    case callback(String)
}

/// What recording an instance report did.
public struct RecordedReport: Sendable, Equatable {
    public var instance: Instance
    /// Whether the instance is new or its state changed.
    public var stateChanged: Bool
}

/// What a check-in did, and what the appliance is to do.
public struct RecordedCheckIn: Sendable, Equatable {
    /// Pending actions for the appliance, oldest first.
    public var actions: [Action]
    /// Instances the summary created or changed the state of.
    public var changes: [InstanceEvent]
}

/// What one housekeeping pass did.
public struct HousekeepingResult: Sendable, Equatable {
    /// Offers withdrawn for want of reports (now inactive).
    public var withdrawn: [InstanceEvent] = []
    /// Reservations that lapsed unclaimed.
    public var lapsed: Int = 0
    /// Dead instance records deleted.
    public var purged: Int = 0

    public init() {}
}

/// The pool's storage: ``SQLiteStore`` (the embedded default) or
/// ``PostgresStore`` (several replicas on one database). The
/// HTTP routes and the admin commands see only this protocol.
public protocol PoolStore: Sendable {
    /// Why the pool cannot do its work (its database unreadable, or not at
    /// the migrations this build knows), or nil when it can.
    func readinessProblem() async -> String?
    /// The migrations applied to the database, oldest first.
    func appliedMigrations() async throws -> [String]
    /// How many instance records are in each state (for `/metrics`).
    func instanceCountsByState() async throws -> [InstanceState: Int]

    /// Adds a key to `owner`'s: 409 for a name or a key they have already,
    /// or beyond `maxKeys`.
    func addSSHKey(owner: String, name: String, key: SSHPublicKey, maxKeys: Int, at date: Date) async throws -> SSHKey
    /// `owner`'s keys, oldest first.
    func sshKeys(owner: String) async throws -> [SSHKey]
    /// Removes one of `owner`'s keys, named by id or name.
    func deleteSSHKey(owner: String, key: String) async throws -> SSHKey

    /// Creates a user whose token has the given digest, managed by
    /// `manager` (an existing user) when given.
    func addUser(
        name: String, superuser: Bool, maxInstances: Int, tokenDigest: String, manager: String?, leaseSeconds: Int?
    ) async throws -> User
    func users() async throws -> [User]

    /// Creates an appliance owned by an existing user.
    func addAppliance(name: String, owner: String, tokenDigest: String) async throws -> Appliance
    func appliances() async throws -> [Appliance]
    /// Sets the region an appliance is in (nil: none).
    func setAppliance(_ name: String, region: String?) async throws -> Appliance
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
    /// reported it (or that the pool placed it on): another appliance gets
    /// ``PoolError/forbidden(_:)`` and changes nothing. Keeps the newest
    /// `consoleLimit` console lines. A pending reservation of the instance
    /// becomes its owner, wisp and callback.
    func recordReport(_ report: InstanceReport, appliance: String, consoleLimit: Int, maxInstances: Int, at date: Date) async throws
        -> RecordedReport
    /// How to boot the instance: its callback, else its wisp, else its
    /// owner's default wisp, else the system default.
    func bootSource(forInstance name: String) async throws -> BootSource
    /// Records why the instance got no start parameters (nil: it did).
    func setLastError(_ message: String?, forInstance name: String) async throws
    func instances() async throws -> [Instance]

    /// The user whose token has this digest.
    func user(tokenDigest: String) async throws -> User?
    /// The pool's Ed25519 signing key (its 32-byte raw form), made on first use.
    func signingKey() async throws -> Data
    /// The user named `name`, or ``PoolError/notFound(what:name:)``.
    func user(named name: String) async throws -> User
    /// Enables or disables a user.
    func setUser(_ name: String, enabled: Bool) async throws -> User
    /// Replaces a user's token (the old one is refused from then on).
    func setUserToken(_ name: String, tokenDigest: String) async throws -> User
    /// One page of instances, ordered by id: those of `owners` (all when
    /// nil), warm ones only with `includeWarm`, of the user with id
    /// `ownerID` when given, with ids after `marker`, at most `limit`.
    func setFlavor(_ name: String, active: Bool) async throws -> Flavor
    func setImage(_ name: String, active: Bool?, loginUser: String??) async throws -> Image
    func setUserLimits(_ name: String, maxInstances: Int?, leaseSeconds: Int??) async throws -> User
    /// Changes a template; warm instances of what it was are retired.
    func setTemplate(_ name: String, wisp: String?, flavor: String?, hotStarts: Int?, at date: Date) async throws -> Template
    /// Removes a template; the names of the warm instances being decommissioned.
    func removeTemplate(_ name: String, at date: Date) async throws -> [String]
    /// Changes what a wisp boots (nil leaves a part as it is); warm
    /// instances of its templates are retired. The wisp, and those names.
    func setWisp(_ name: String, _ change: WispChange, at date: Date) async throws -> (wisp: Wisp, retired: [String])
    /// Removes a wisp no template and no live instance boots from.
    func removeWisp(_ name: String) async throws

    func instancesPage(
        owners: Set<String>?, sharedWith: String?, includeWarm: Bool, ownerID: String?, after marker: String?, limit: Int
    ) async throws -> [Instance]

    /// Records a check-in (its appliance block goes through
    /// ``recordCheckIn(_:block:at:)``): last seen, stats, the state of each summarized
    /// instance (new ones are created, other appliances' are left alone),
    /// and the actions now done. Returns the actions still pending.
    func checkIn(_ appliance: String, request: CheckInRequest, maxInstances: Int, at date: Date) async throws -> RecordedCheckIn
    /// The appliance's actions not yet done, oldest first.
    func pendingActions(appliance: String) async throws -> [Action]
    /// Signalled after every change to the actions (a held check-in waits for it).
    var actionsChanged: ChangeSignal { get }
    /// Signals `actionsChanged` for actions other processes commit, until
    /// cancelled (the admin CLI writes the database itself).
    func followOtherWriters(every interval: Duration) async throws
    /// The launch phases of the instance with this id or name, in order.
    func timeline(ofInstance id: String) async throws -> [TimelineEntry]

    /// Queues an action for the appliance an instance is on.
    func enqueueAction(_ kind: Action.Kind, instance: String, expires: Date?, at date: Date) async throws -> Action

    /// Reserves an offered instance, or places a new instance of a flavor
    /// on an appliance with room (queuing its start), for `user`, checking
    /// the user's limit in the same transaction.
    func reserve(_ request: ReservationRequest, user: String, lifetime: Int, applianceStaleAfter: Int, at date: Date)
        async throws -> Reservation
    func reservations() async throws -> [Reservation]

    /// Creates an instance for a user in one transaction: checks the user's
    /// limit, hands over a ready warm instance of the template if there is
    /// one, else places a new instance on the appliance with the most room
    /// (queuing its start). Leased for the user's lease, else
    /// `defaultLeaseSeconds`. ``PoolError/conflict(_:)`` at the limit,
    /// ``PoolError/unavailable(_:)`` when no appliance has room.
    func createInstance(_ request: InstanceRequest, defaultLeaseSeconds: Int, applianceStaleAfter: Int, at date: Date)
        async throws -> Instance
    /// The instance with this id (or name).
    func instance(id: String) async throws -> Instance?
    /// Adds, replaces or deletes the users with access (ids or names); the
    /// owner keeps access.
    func changeUsers(ofInstance id: String, _ change: UsersChange, users: [String], at date: Date) async throws -> Instance
    /// Moves the lease's end `seconds` on (from now if it has passed) and
    /// queues the lease change for the appliance.
    func extendLease(ofInstance id: String, bySeconds seconds: Int, atMost most: Int, at date: Date) async throws -> Instance

    /// Adds a template; its wisp and flavor must exist.
    func addTemplate(_ template: Template) async throws
    func templates() async throws -> [Template]
    /// Retires warm instances older than `maxAgeSeconds`, drops failed or
    /// stopped ones, and places new ones until each template has
    /// `hotStarts` warm instances.
    func maintainWarmPools(maxAgeSeconds: Int, applianceStaleAfter: Int, at date: Date) async throws -> WarmPoolPass

    /// Lapses unclaimed reservations, withdraws silent offers, purges dead records.
    func housekeep(at date: Date, offerStaleAfter: Int, purgeAfter: Int) async throws -> HousekeepingResult

    /// Whether this process runs the pool-wide passes (housekeeping, warm
    /// pools) now: always on SQLite; on PostgreSQL, the one replica that
    /// holds the leader lock.
    func leads() async -> Bool

    /// Tells the other replicas of an event this one published (on SQLite,
    /// with one process, nothing).
    func announce(_ event: InstanceEvent) async
    /// Hands the events the other replicas announce to `deliver`, until
    /// cancelled (on SQLite, none: it returns at once).
    func followAnnouncements(_ deliver: @escaping @Sendable (InstanceEvent) -> Void) async throws

    /// Asks the leading replica for a warm-pool pass soon (a hand-out or a
    /// template change on one that does not lead; on SQLite, nothing).
    func askForWarmPoolPass() async
    /// Calls `wake` whenever another replica asks for a warm-pool pass,
    /// until cancelled (on SQLite, never: it returns at once).
    func followWarmPoolAsks(_ wake: @escaping @Sendable () -> Void) async throws
}

extension SQLiteStore {
    /// One process serves a SQLite file: it always leads.
    public func leads() async -> Bool { true }
    public func announce(_ event: InstanceEvent) async {}
    public func followAnnouncements(_ deliver: @escaping @Sendable (InstanceEvent) -> Void) async throws {}
    public func askForWarmPoolPass() async {}
    public func followWarmPoolAsks(_ wake: @escaping @Sendable () -> Void) async throws {}
}

extension PoolStore {
    /// Creates a user with no manager and the pool's default lease.
    public func addUser(name: String, superuser: Bool, maxInstances: Int, tokenDigest: String) async throws -> User {
        try await addUser(
            name: name, superuser: superuser, maxInstances: maxInstances, tokenDigest: tokenDigest, manager: nil, leaseSeconds: nil)
    }
}
